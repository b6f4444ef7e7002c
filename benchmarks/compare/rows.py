"""The rows of the comparison: one setting each, as lowbit's recipe and as llm-compressor's.

Plain data, imported by both runners (so it imports neither tool). Grids match where the tools
share a method: compressed-tensors' symmetric integer grid is the full signed range (scale =
max / 7.5 for 4 bits, codes -8..7), lowbit's `f` suffix; activations per token, dynamic; weights
per output channel or in groups of 64 along the input. llm-compressor's rotation rows use its
SpinQuant modifier with random-sign Hadamard matrices (the only kind it builds for a hidden size
that is not a power of two) for R1, R2 and R4, as in its own W4A4 example; lowbit's use its
`rotate` transform. The KV cache stays in 16 bits except in the lowbit-only rows marked so.
"""

from __future__ import annotations

# Each row: key, what it measures, weight bits and group (None: per channel), activation and KV
# bits (16: not quantized), lowbit's recipe (the keys of a lowbit recipe file, or the name of a
# named recipe: the recommended ones are measured in the rows of their setting) and
# llm-compressor's counterpart (None: lowbit only).
ROWS: list[dict] = [
    {
        "key": "w4a16-rtn",
        "setting": "W4A16 per channel",
        "method": "RTN",
        "w_bits": 4,
        "group": None,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA16"},
        "llmcompressor": {"weights": {"bits": 4}, "method": "rtn"},
    },
    {
        "key": "w4a16-gptq",
        "setting": "W4A16 per channel",
        "method": "GPTQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": "w4a16",
        "llmcompressor": {"weights": {"bits": 4}, "method": "gptq"},
    },
    {
        "key": "w4a16-awq",
        "setting": "W4A16 per channel",
        "method": "AWQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA16", "algorithm": "awq"},
        "llmcompressor": {"weights": {"bits": 4}, "method": "awq"},
    },
    {
        "key": "w4g64a16-rtn",
        "setting": "W4A16 g64",
        "method": "RTN",
        "w_bits": 4,
        "group": 64,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4g64fA16"},
        "llmcompressor": {"weights": {"bits": 4, "group": 64}, "method": "rtn"},
    },
    {
        "key": "w4g64a16-gptq",
        "setting": "W4A16 g64",
        "method": "GPTQ",
        "w_bits": 4,
        "group": 64,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4g64fA16", "algorithm": "gptq"},
        "llmcompressor": {"weights": {"bits": 4, "group": 64}, "method": "gptq"},
    },
    {
        "key": "w4g64a16-awq",
        "setting": "W4A16 g64",
        "method": "AWQ",
        "w_bits": 4,
        "group": 64,
        "a_bits": 16,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4g64fA16", "algorithm": "awq"},
        "llmcompressor": {"weights": {"bits": 4, "group": 64}, "method": "awq"},
    },
    {
        "key": "w8a8-smoothquant-gptq",
        "setting": "W8A8",
        "method": "SmoothQuant (alpha 0.5) + GPTQ",
        "w_bits": 8,
        "group": None,
        "a_bits": 8,
        "kv_bits": 16,
        "lowbit": "w8a8",
        "llmcompressor": {"weights": {"bits": 8}, "acts": 8, "smoothquant": 0.5, "method": "gptq"},
    },
    {
        "key": "w4a4-rotate-rtn",
        "setting": "W4A4 KV16",
        "method": "rotation (R1 R2 R4) + RTN",
        "w_bits": 4,
        "group": None,
        "a_bits": 4,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA4f", "transform": "rotate"},
        "llmcompressor": {"weights": {"bits": 4}, "acts": 4, "spinquant": ["R1", "R2", "R4"], "method": "rtn"},
    },
    {
        "key": "w4a4-rotate-gptq",
        "setting": "W4A4 KV16",
        "method": "rotation (R1 R2 R4) + GPTQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 4,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA4f", "transform": "rotate", "algorithm": "gptq"},
        "llmcompressor": {"weights": {"bits": 4}, "acts": 4, "spinquant": ["R1", "R2", "R4"], "method": "gptq"},
    },
    {
        "key": "w4a4-rotate-online-rtn",
        "setting": "W4A4 KV16",
        "method": "online R1, norms kept + RTN",
        "w_bits": 4,
        "group": None,
        "a_bits": 4,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA4f", "transform": "rotate", "fuse_r1": False, "fold_norms": False},
        "llmcompressor": None,
    },
    {
        "key": "w4a4-rotate-online-gptq",
        "setting": "W4A4 KV16",
        "method": "online R1, norms kept + GPTQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 4,
        "kv_bits": 16,
        "lowbit": {"scheme": "W4fA4f", "transform": "rotate", "fuse_r1": False, "fold_norms": False, "algorithm": "gptq"},
        "llmcompressor": None,
    },
    {
        "key": "rec-w4a8kv4",
        "setting": "W4A8KV4",
        "method": "recommended: online R1, norms kept + GPTQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 8,
        "kv_bits": 4,
        "lowbit": "w4a8kv4",
        "llmcompressor": None,
    },
    {
        "key": "rec-w4a4kv4",
        "setting": "W4A4KV4",
        "method": "recommended: online R1, norms kept + GPTQ",
        "w_bits": 4,
        "group": None,
        "a_bits": 4,
        "kv_bits": 4,
        "lowbit": "w4a4kv4",
        "llmcompressor": None,
    },
]
BY_KEY = {row["key"]: row for row in ROWS}
