"""How vLLM's CPU build rounds keys and values into its FP8 KV cache: write the same bfloat16 keys
and values with vLLM's op (`cpu_attn_reshape_and_cache`, kv_cache_dtype "fp8", static scales) and
compare the stored E4M3 values with x / scale rounded to nearest (ties to even, as the OCP FP8
conversion and lowbit do) and rounded toward zero. Runs in vLLM's environment (setup_vllm.sh),
never imports lowbit; the multisets are compared, so the cache's internal layout does not matter.

    benchmarks/.venvs/vllm/bin/python benchmarks/engines/vllm_fp8_kv_probe.py
"""

import torch
from vllm import _custom_ops as ops


def toward_zero(v: torch.Tensor) -> torch.Tensor:
    """The E4M3 value of largest magnitude not above |v| (saturating at 448), with v's sign."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    magnitudes = grid[torch.isfinite(grid) & (grid >= 0)].unique().sort().values
    index = torch.searchsorted(magnitudes, v.abs().clamp(max=448).contiguous(), right=True) - 1
    return magnitudes[index] * v.sign()


def main() -> None:
    torch.manual_seed(0)
    tokens, heads, head_dim, block = 32, 3, 64, 32
    key = (torch.randn(tokens, heads, head_dim) * 2).bfloat16()
    value = (torch.randn(tokens, heads, head_dim) * 2).bfloat16()
    k_scale, v_scale = 0.05, 0.02
    cache = torch.zeros(1, heads, 2 * block, head_dim, dtype=torch.uint8)  # vLLM's CPU layout: keys, then values
    key_cache, value_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(tokens), "vec", k_scale, v_scale, "fp8")
    for name, x, scale, stored in (("keys", key, k_scale, key_cache), ("values", value, v_scale, value_cache)):
        got = stored.contiguous().view(torch.float8_e4m3fn).float().flatten().sort().values
        v = x.float().flatten() / scale
        nearest = v.to(torch.float8_e4m3fn).float().sort().values
        truncated = toward_zero(v).sort().values
        print(
            f"{name}: {got.numel()} entries; differing from round-to-nearest: {int((got != nearest).sum())}, "
            f"from round-toward-zero: {int((got != truncated).sum())}"
        )


if __name__ == "__main__":
    main()
