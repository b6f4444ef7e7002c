"""Export to GGUF, the file format of llama.cpp (and of the engines built on it: Ollama, LM Studio).

llama.cpp's legacy block types hold lowbit's grouped integer weights as they are: blocks of 32
consecutive inputs of one output row, each with a float16 scale (and, Q4_1, a float16 offset).
The codes and scales written are the model's own `QuantizedWeight` (nothing is quantized again),
so the weight llama.cpp dequantizes equals lowbit's dequantized weight bit for bit in float32:

- Q8_0 (`W8g32h`, or `W8g32fh`): d * q with q = the int8 code;
- Q4_0 (`W4g32fh`, codes -8..7, or `W4g32h`, codes -7..7): d * (q - 8) with q = code + 8, the
  first 16 values of a block in the low nibbles of its 16 bytes and the next 16 in the high ones;
- Q4_1 (`W4g32ah`): d * q + m with q = the code (0..15) and m = lowbit's real-valued offset
  (`zero`), which is exactly what Q4_1 stores (no integer zero point).

MSE-searched or clipped scales (`m`, `c<P>` suffixes) change the values, not the layout: they
export too. Activations: weight-only schemes, or `A8g32h` (symmetric 8-bit dynamic blocks of 32
with float16 scales), which is what llama.cpp's CPU backend does to activations before its
integer dot products (Q8_0 blocks, Q8_1 for Q4_1 weights). The grid is the same; the codes can
differ at rounding ties, since llama.cpp rounds x * (1/d) with d in float32 before storing d in
float16, where lowbit divides by the float16 scale.

Everything else in the model is written as llama.cpp's converter writes it: embeddings, linears
left unquantized and an untied lm_head in `dtype` (F16, F32 or BF16), 1-D tensors (norms,
biases) in F32, Gemma's norm weights as 1 + weight, and Llama's q_proj / k_proj rows permuted per
head to the interleaved RoPE layout llama.cpp's "llama" architecture uses. A tied lm_head is not
written (llama.cpp then uses token_embd).

Architectures: llama and mistral (GGUF "llama"), qwen2, qwen3, gemma2 and gemma3. Tokenizers:
byte-level BPE (GPT-2 style: SmolLM2, Qwen, Llama 3), written as llama.cpp's "gpt2" vocabulary.

Refused, with what to change: other bit widths, group sizes, scale formats and granularities,
floating-point element formats (FP8, MXFP, NVFP4), other activation schemes, KV-cache
quantization and online rotations (they run inside lowbit's model at inference; llama.cpp has no
place for them), SentencePiece vocabularies, and model settings llama.cpp cannot express.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arch import ATTN_LINEARS, get_arch, head_dim
from ..errors import UserError
from ..files import OutputExistsError, write_file_atomically
from ..runtime.kv import KEY_QUANT, VALUE_QUANT
from ..runtime.linear import QuantLinear
from ..runtime.state import require_state
from ..scheme import Granularity, Observer, QuantArgs
from .export import check_no_prefix, export_dtype, online_rotations

log = logging.getLogger("lowbit")

BLOCK = 32  # llama.cpp's legacy blocks: 32 consecutive inputs of one output row

# lowbit's weight layout (as a scheme names it) -> the ggml block type that holds it unchanged.
# Observer and clipping suffixes (m, c<P>) change values, not layout, and export the same way.
GGUF_TYPES: dict[str, str] = {
    "W8g32h": "Q8_0",  # symmetric int8, codes +-127, float16 scale per 32: d * q
    "W8g32fh": "Q8_0",  # the full signed range, codes -128..127: d * q
    "W4g32fh": "Q4_0",  # symmetric int4 over the full range, codes -8..7: d * (q - 8), q = code + 8
    "W4g32h": "Q4_0",  # symmetric int4, codes -7..7: the same layout, one code unused
    "W4g32ah": "Q4_1",  # asymmetric int4, codes 0..15, float16 scale and offset: d * q + m
}

# The activation scheme llama.cpp's CPU backend computes for these weights.
ACTIVATIONS = "A8g32h"

# lowbit's model_type -> llama.cpp's architecture
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3"}

_RECIPE_HINT = {
    4: "quantize with W4g32fh (Q4_0) or W4g32ah (Q4_1), e.g. --recipe gguf-q4_0",
    8: "quantize with W8g32h (Q8_0), e.g. --recipe gguf-q8_0",
}


def _gguf_type(args: QuantArgs) -> str | None:
    """The ggml type that holds weights quantized with `args` exactly, or None."""
    if args.is_float or args.granularity is not Granularity.GROUP or args.group_size != BLOCK or args.scale_format != "float16":
        return None
    if args.bits == 8 and args.symmetric:
        return "Q8_0"
    if args.bits == 4:
        return "Q4_0" if args.symmetric else "Q4_1"
    return None


def _weight_refusal(name: str, args: QuantArgs) -> str:
    """Why weights quantized with `args` have no ggml block type, and what to quantize with instead."""
    hint = _RECIPE_HINT.get(args.bits, _RECIPE_HINT[4])
    if args.is_float:
        why = f"{args.format_name} elements have no llama.cpp block type (its legacy types hold integers)"
    elif args.bits not in (4, 8):
        why = f"{args.bits}-bit weights; llama.cpp's legacy block types hold 4- and 8-bit integers (Q4_0, Q4_1, Q8_0)"
    elif args.bits == 8 and not args.symmetric:
        why = "asymmetric 8-bit weights; Q8_0 is symmetric (d * q)"
    else:
        why = f"llama.cpp's {args.bits}-bit layouts are blocks of 32 with float16 scales"
    return f"cannot export {name} to GGUF: {why}; {hint}"


def _activations_ok(args: QuantArgs | None) -> bool:
    return args is None or (
        args.bits == 8
        and args.symmetric
        and not args.full_range
        and not args.is_float
        and args.granularity is Granularity.GROUP
        and args.group_size == BLOCK
        and args.scale_format == "float16"
        and args.dynamic
        and args.clip_ratio == 1.0
        and args.observer is Observer.MINMAX
    )


def check_gguf_exportable(model: nn.Module) -> dict[str, str]:
    """The ggml type of each quantized linear ("Q4_0", "Q4_1" or "Q8_0"), by module name, or a
    UserError that says what to change."""
    scheme = require_state(model, "export to GGUF").scheme
    name = scheme.name
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise UserError(f"cannot export {model_type!r} to GGUF: the GGUF export writes {', '.join(sorted(GGUF_ARCHS))} models")
    get_arch(model)
    check_no_prefix(scheme, "GGUF")
    if scheme.weights is None:
        raise UserError(f"cannot export {name} to GGUF: GGUF stores quantized weights and {name} has none; {_RECIPE_HINT[4]}")
    if _gguf_type(scheme.weights) is None:
        raise UserError(_weight_refusal(name, scheme.weights))
    if not _activations_ok(scheme.inputs):
        raise UserError(
            f"cannot export {name} to GGUF: llama.cpp quantizes activations itself, to symmetric 8-bit blocks of 32 with "
            f"float16 scales ({ACTIVATIONS}); quantize weight-only (e.g. W4g32fh) or with {ACTIVATIONS} (e.g. W4g32fh{ACTIVATIONS})"
        )
    if scheme.keys is not None or scheme.values is not None:
        raise UserError(
            f"cannot export {name} to GGUF: lowbit's KV-cache quantization is not stored in the model file (llama.cpp "
            "chooses its cache type at run time, --cache-type-k); quantize without KV (e.g. W4g32fh instead of W4g32fhKV8)"
        )
    rotated = online_rotations(model)
    if rotated:
        raise UserError(
            f"cannot export {name} to GGUF: {len(rotated)} modules rotate their input online (e.g. {rotated[0]}); llama.cpp's "
            "graphs have no place for lowbit's online rotations, Hadamard or learned (transform 'smooth', or 'rotate' fused "
            "with r2, r3 and r4 off, exports)"
        )
    for n, m in model.named_modules():
        if getattr(m, KEY_QUANT, None) is not None or getattr(m, VALUE_QUANT, None) is not None:
            raise UserError(f"cannot export {name} to GGUF: {n} quantizes its KV cache")
    types = {}
    for n, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.weight_args is not None and not m.is_quantized:
            raise UserError(f"cannot export: {n} still trains a latent weight; call lowbit.qat.freeze_student(model) first")
        if m.input_quant is not None and not _activations_ok(m.input_quant.args):
            got = m.input_quant.args.name()
            raise UserError(f"cannot export {name} to GGUF: {n} quantizes its input with A{got}; llama.cpp computes {ACTIVATIONS}")
        if m.is_quantized:
            qtype = _gguf_type(m.weight_args)
            if qtype is None:
                raise UserError(_weight_refusal(f"{n} (W{m.weight_args.name()})", m.weight_args))
            if m.in_features % BLOCK:
                raise UserError(f"cannot export {n} to GGUF: {m.in_features} inputs are not a whole number of blocks of {BLOCK}")
            types[n] = qtype
    return types


# --------------------------------------------------------------------------- tensors


def _blocks(qweight, qtype: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The ggml blocks of a quantized weight, as uint8 [out, in/32 * block bytes], output rows in
    the order `rows` (default: as they are)."""
    out, cols = qweight.shape
    per_row = cols // BLOCK
    codes = qweight.codes.reshape(out, per_row, BLOCK).numpy()
    scale = qweight.scale.reshape(out, per_row).to(torch.float16).numpy()
    zero = None if qweight.zero is None else qweight.zero.reshape(out, per_row).to(torch.float16).numpy()
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        zero = None if zero is None else zero[rows]
    parts = [scale[..., None].view(np.uint8)]
    if qtype == "Q8_0":
        if codes.min() < -128 or codes.max() > 127:
            raise ValueError("Q8_0 codes out of the int8 range")
        parts.append(codes.astype(np.int8).view(np.uint8))
    else:
        q = codes + 8 if qtype == "Q4_0" else codes
        if q.min() < 0 or q.max() > 15:
            raise ValueError(f"{qtype} codes out of 0..15")
        q = q.astype(np.uint8)
        if qtype == "Q4_1":
            parts.append(zero[..., None].view(np.uint8))
        parts.append(q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4))  # ggml: value j low nibble, j + 16 high nibble
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out, -1))


def _dense(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    """A float tensor as the array the writer takes, and its raw type (None: from the array's dtype)."""
    from gguf import GGMLQuantizationType

    t = t.detach().cpu()
    if dtype == "float32" or t.dim() == 1:
        return t.float().contiguous().numpy(), None
    if dtype == "float16":
        return t.to(torch.float16).contiguous().numpy(), None
    bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return bits.reshape(*t.shape[:-1], t.shape[-1] * 2), GGMLQuantizationType.BF16


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """The row order llama.cpp's "llama" architecture expects for q_proj / k_proj: within each head,
    transformers' rotate-half pairs (i, i + d/2) become adjacent rows (2i, 2i + 1)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, 2, half).swapaxes(1, 2).reshape(-1)


@dataclass
class _Tensor:
    name: str
    data: np.ndarray
    raw_dtype: object = None


def _tensors(model: nn.Module, arch: str, types: dict[str, str], dtype: str) -> list[_Tensor]:
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map

    spec = get_arch(model)
    config = model.config
    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    names = get_tensor_name_map(MODEL_ARCH(arch_id), config.num_hidden_layers)
    q_name, k_name = ATTN_LINEARS[0].rsplit(".", 1)[-1], ATTN_LINEARS[1].rsplit(".", 1)[-1]
    permute = {}
    if arch == "llama":  # llama.cpp's llama runs the interleaved RoPE: q and k rows are permuted per head
        permute = {q_name: config.num_attention_heads, k_name: getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    lm_head = model.get_submodule(spec.lm_head)
    embed = model.get_submodule(spec.embed)
    tied = isinstance(lm_head, nn.Linear) and lm_head.weight is embed.weight
    out: list[_Tensor] = []
    for module_name, module in model.named_modules():
        params = {} if isinstance(module, QuantLinear) and module.is_quantized else dict(module.named_parameters(recurse=False))
        if not params and not (isinstance(module, QuantLinear) and module.is_quantized):
            continue
        if module_name == spec.lm_head and tied:
            continue
        gguf_name = names.get_name(module_name)
        if gguf_name is None:
            raise UserError(f"cannot export {module_name} to GGUF: llama.cpp's {arch} architecture has no tensor for it")
        leaf = module_name.rsplit(".", 1)[-1]
        rows = None
        if leaf in permute:
            rows = _rope_rows(module.out_features, permute[leaf])
        if isinstance(module, QuantLinear) and module.is_quantized:
            qtype = types[module_name]
            out.append(_Tensor(f"{gguf_name}.weight", _blocks(module.quantized_weight, qtype, rows), GGMLQuantizationType[qtype]))
            if module.bias is not None:
                params = {"bias": module.bias}
        for pname, p in params.items():
            t = p.detach()
            if isinstance(module, QuantLinear) and pname == "weight":
                t = module.dense_weight()
            if rows is not None:
                t = t[torch.from_numpy(rows)]
            if t.dim() == 1 and spec.norm_weight_offset and pname == "weight":
                t = t.float() + spec.norm_weight_offset  # llama.cpp's Gemma norms hold offset + weight
            data, raw = _dense(t, dtype)
            out.append(_Tensor(f"{gguf_name}.{pname}", data, raw))
    return out


# --------------------------------------------------------------------------- metadata


def _rope(config) -> tuple[dict, dict | None]:
    """(the full-attention RoPE parameters, the sliding-window layers' ones or None)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention") or {}, params.get("sliding_attention")
    return params, None


def _theta(config, rope: dict) -> float:
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("cannot export to GGUF: the config states no RoPE base (rope_theta)")
    return float(theta)


def _check_config(model_type: str, config) -> None:
    """Refuse settings llama.cpp's architecture cannot express (it would run another model)."""
    rope, local = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "yarn"):
        raise UserError(f"cannot export to GGUF: {kind!r} RoPE scaling is not written by the GGUF export yet (default, linear and yarn are)")
    if local is not None and local.get("rope_type", "default") != "default":
        raise UserError("cannot export to GGUF: llama.cpp scales only the full-attention layers' RoPE; the sliding layers' must be default")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        if any(t != "full_attention" for t in layer_types) or getattr(config, "use_sliding_window", False) or (model_type == "mistral" and window):
            arch = GGUF_ARCHS[model_type]
            raise UserError(f"cannot export {model_type} with a sliding window to GGUF: llama.cpp's {arch} architecture attends to the whole context")
        if getattr(config, "mlp_bias", False):
            raise UserError(f"cannot export {model_type} with MLP biases to GGUF")
    if model_type in ("gemma2", "gemma3_text"):
        dim = head_dim(config)
        if getattr(config, "query_pre_attn_scalar", dim) != dim:
            raise UserError(
                f"cannot export to GGUF: llama.cpp scales Gemma's attention by 1/sqrt(head_dim) = 1/sqrt({dim}); this model uses "
                f"query_pre_attn_scalar={config.query_pre_attn_scalar}"
            )
        if model_type == "gemma2" and (config.attn_logit_softcapping is None or config.final_logit_softcapping is None):
            raise UserError("cannot export gemma2 without logit soft-capping to GGUF: llama.cpp's gemma2 always caps them")
        if model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None) is not None:
            raise UserError("cannot export gemma3 with attention logit soft-capping to GGUF: llama.cpp's gemma3 does not cap attention logits")


def _add_config(writer, model_type: str, config) -> None:
    from gguf import RopeScalingType

    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_vocab_size(config.vocab_size)
    rope, local = _rope(config)
    writer.add_rope_freq_base(_theta(config, rope))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if model_type in ("gemma2", "gemma3_text"):
        layer_types = getattr(config, "layer_types", None) or []
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if local is not None:
            writer.add_rope_freq_base_swa(_theta(config, local))
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if model_type == "gemma2":
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))


# --------------------------------------------------------------------------- tokenizer

# llama.cpp's names for the byte-level BPE pre-tokenizers this export recognises by structure
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# model names whose released tokenizers use a pre-tokenizer that a conversion (e.g. from GGUF by
# transformers) may have flattened to plain byte-level
_PRE_BY_NAME = (("smollm", "smollm"), ("qwen", "qwen2"))


def _pre_tokenizer_name(pre: dict | None, source: str) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    split = next((s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"), None)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and split == _QWEN2_SPLIT:
        return "qwen2"
    if kinds == ["Split", "ByteLevel"] and split == _LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        for hint, name in _PRE_BY_NAME:
            if hint in source.lower():
                log.info("GGUF tokenizer: plain byte-level pre-tokenizer of %s written as %r (the released model's)", source, name)
                return name
        return "gpt-2"
    log.warning("GGUF tokenizer: pre-tokenizer %s not recognised; written as llama.cpp's 'default'", kinds)
    return "default"


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _vocab(tokenizer, vocab_size: int) -> _Vocab:
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if tokenizer is None or backend is None:
        raise UserError("cannot export to GGUF: llama.cpp reads the vocabulary from the file; pass the model's fast (tokenizer.json) tokenizer")
    data = json.loads(backend.to_str())
    model = data["model"]
    byte_level = any(
        part is not None and (part.get("type") == "ByteLevel" or any(s.get("type") == "ByteLevel" for s in part.get("pretokenizers", [])))
        for part in (data.get("pre_tokenizer"), data.get("decoder"))
    )
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise UserError(
            f"cannot export the tokenizer to GGUF: the export writes byte-level BPE vocabularies (GPT-2 style: SmolLM2, Qwen, "
            f"Llama 3); this is a {model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''} tokenizer"
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"cannot export to GGUF: the tokenizer has ids up to {max(by_id)}, the model's embedding {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows of the embedding no token uses (llama.cpp's converter names them so)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(value, int):
            special[key] = value
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around text
    template = getattr(tokenizer, "chat_template", None)
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    return _Vocab(
        tokens,
        [int(t) for t in types],
        merges,
        _pre_tokenizer_name(data.get("pre_tokenizer"), source),
        special,
        bool(probe) and "bos" in special and probe[0] == special["bos"],
        bool(probe) and "eos" in special and probe[-1] == special["eos"],
        template if isinstance(template, str) else None,
    )


def _add_vocab(writer, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, value in vocab.special.items():
        adders[key](value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --------------------------------------------------------------------------- export


def export_gguf(model: nn.Module, out: str | Path, tokenizer, *, dtype: str = "float16", overwrite: bool = False) -> Path:
    """Write `model` (a lowbit-quantized model; not modified) and its tokenizer as one GGUF file
    that llama.cpp runs, its quantized linears in the ggml block types of `check_gguf_exportable`
    and the other tensors in `dtype` ("float16", "float32" or "bfloat16"; 1-D tensors in float32).
    The file is written under a temporary name beside `out` and renamed into place. Returns `out`."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf") from None
    export_dtype(dtype)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it or choose another file")
    types = check_gguf_exportable(model)
    config = model.config
    model_type = config.model_type
    arch = GGUF_ARCHS[model_type]
    _check_config(model_type, config)
    vocab = _vocab(tokenizer, config.vocab_size)
    scheme = require_state(model, "export to GGUF").scheme
    with torch.no_grad():
        tensors = _tensors(model, arch, types, dtype)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{max(counts, key=counts.get)}")
    name = Path(str(getattr(config, "_name_or_path", "") or arch)).name or arch
    log.info("exporting %s to GGUF (%s, %d quantized linears) in %s", scheme.name, file_type.name, len(types), out)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_description(f"quantized by lowbit: {scheme.name}")
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_config(writer, model_type, config)
        _add_vocab(writer, vocab)
        for t in tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    if out.exists() and not overwrite:  # appeared while the tensors were prepared
        raise OutputExistsError(f"{out} was created by another run meanwhile; it is kept")
    return write_file_atomically(out, write)
