"""Size, OPs and KV-cache memory of a (quantized) model.

Conventions (stated in every report):
- size: quantized weights packed at their bit width, plus one scale per row or group (and one
  offset for asymmetric) in the scheme's scale format (float32 unless it says h or b; E8M0 or
  E4M3 for the MX and NVFP4 blocks, plus NVFP4's float32 tensor scale); every other parameter
  (embeddings, norms, unquantized linears) at 16 bits; tied tensors counted once.
- OPs (LLM-QAT): MACs x W_bits x A_bits for every linear layer including lm_head, plus the two
  attention matmuls (Q K^T and P V, causal) at 16 x KV bits, for one sequence of `seq_len` tokens.
  The bits of a per-group or block format include its share of the scales (`bits_per_value`:
  NVFP4 4.5, MXFP4 4.25, MXFP8 8.25, INT4 in groups of 128 with float32 scales 4.25).
- Mixture of experts: every expert's weights count in the size (all are stored); each token runs
  only its top-k experts, so the experts' MACs are seq_len x top_k x one expert's MACs (exact, as
  all experts of a block have one shape), not seq_len x every expert. The router's matmul
  (hidden x experts per token) counts at 16 x 16 bits: it is never quantized.
- KV cache: keys and values of every layer at their bit width plus one scale per token and head
  (and offset if asymmetric) in the scale format, for a full (not sliding-window) cache.
- Full-precision prefix (a scheme with P<N>): the first N tokens of the sequence (of the
  `seq_len`, or of each KV-cache context) are counted at 16 bits: their linear MACs at W_bits x
  16, the attention MACs against their keys / values at 16 x 16, their keys and values at 16 bits
  with no scales.

`scheme_cost` gives the same numbers for any scheme from the unquantized model, without
quantizing it (a table comparing schemes); `stored_bytes` is what the tensors really take in
memory (e.g. the integer kernels' packed codes and their scale layout).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..arch import ArchSpec, decoder_layers, expert_dims, get_arch, get_module, head_dim, is_moe_layer, layer_linear_names
from ..quant.qweight import quantized_nbytes, scale_count
from ..runtime.experts import QuantExperts
from ..runtime.int_linear import INT_LINEARS, Int8Linear
from ..runtime.linear import QuantLinear
from ..scheme import Granularity, QuantArgs, Scheme, parse_scheme


def quantized_weight_bytes(rows: int, cols: int, args: QuantArgs) -> int:
    return quantized_nbytes(rows * cols, scale_count(rows, cols, args), args, 1 if args.global_scale else 0)


def _bits(args: QuantArgs | None) -> float:
    return 16 if args is None else args.bits_per_value


def _prefix_tokens(scheme: Scheme | None, tokens: int) -> int:
    """How many of a sequence's `tokens` the scheme keeps in full precision."""
    return min(scheme.fp_prefix, tokens) if scheme is not None else 0


def _linear_ops(macs_per_token: float, seq_len: int, w_bits: float, a_bits: float, prefix: int) -> float:
    """OPs of a linear over `seq_len` tokens, the first `prefix` of them with 16-bit inputs."""
    return macs_per_token * ((seq_len - prefix) * w_bits * a_bits + prefix * w_bits * 16)


def weight_bits(model: nn.Module) -> float | None:
    """Bits per weight of the quantized linears at rest (codes, scales, global scales), None if none."""
    count = total = 0
    for module in model.modules():
        if isinstance(module, INT_LINEARS) or (isinstance(module, QuantLinear) and module.weight_args is not None):
            count += module.out_features * module.in_features
            total += quantized_weight_bytes(module.out_features, module.in_features, module.weight_args)
    return 8 * total / count if count else None


def storage_key(param: torch.Tensor) -> int:
    """Identifies the memory a parameter lives in (tied parameters share it); a meta tensor (a
    layer on disk, `lowbit.onload`) has none, so it is itself."""
    return id(param) if param.is_meta else param.data_ptr()


def model_size_bytes(model: nn.Module) -> int:
    quantized = {}  # id(latent weight parameter) -> bytes, for linears training a latent weight
    total = 0
    for module in model.modules():
        if isinstance(module, INT_LINEARS) or (isinstance(module, QuantLinear) and module.is_quantized):
            # the weight is held as codes, not as a float parameter: count it at its bit width
            total += quantized_weight_bytes(module.out_features, module.in_features, module.weight_args)
        elif isinstance(module, QuantLinear) and module.weight_args is not None:
            quantized[id(module.weight)] = quantized_weight_bytes(module.out_features, module.in_features, module.weight_args)
    seen = set()
    for param in model.parameters():
        key = storage_key(param)
        if key in seen:
            continue
        seen.add(key)
        total += quantized.get(id(param), param.numel() * 2)
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take in memory as they are stored (shared storage once)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _linear_bits(module: nn.Module) -> tuple[float, float] | None:
    """(W_bits, A_bits) of a linear layer in any of its forms, None for anything else."""
    if isinstance(module, QuantLinear):
        return _bits(module.weight_args), _bits(module.input_quant.args if module.input_quant else None)
    if isinstance(module, Int8Linear):
        return _bits(module.weight_args), _bits(module.input_args)
    if isinstance(module, INT_LINEARS):
        return _bits(module.weight_args), 16
    if isinstance(module, nn.Linear):
        return 16, 16
    return None


@dataclass
class OpsCount:
    macs: int
    ops: int  # MACs x W_bits x A_bits
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _MoEParts:
    """What the cost conventions treat specially in a mixture-of-experts model."""

    active: dict[int, float]  # id(expert linear) -> share of tokens that run it (top_k / experts)
    stock: list[tuple[nn.Module, int, int, int]]  # stock fused experts modules: (module, experts, hidden, inner)
    top_k: int
    router_macs: int  # per token


def _moe_parts(model: nn.Module, spec: ArchSpec) -> _MoEParts:
    parts = _MoEParts({}, [], 0, 0)
    if spec.moe is None:
        return parts
    parts.top_k = getattr(model.config, spec.moe.top_k)
    for layer in decoder_layers(model, spec):
        if not is_moe_layer(layer, spec):
            continue
        experts = get_module(layer, spec.moe.experts)
        n, hidden, inner = expert_dims(experts, spec.moe)
        if isinstance(experts, QuantExperts):
            parts.active.update({id(m): parts.top_k / n for m in experts.modules() if _linear_bits(m) is not None})
        else:
            parts.stock.append((experts, n, hidden, inner))
        parts.router_macs += get_module(layer, spec.moe.router).weight.numel()
    return parts


def model_ops(model: nn.Module, scheme: Scheme | None, seq_len: int) -> OpsCount:
    moe = _moe_parts(model, get_arch(model))
    macs = ops = 0
    for module in model.modules():
        bits = _linear_bits(module)
        if bits is None:
            continue
        per_token = module.in_features * module.out_features * moe.active.get(id(module), 1)
        quantizer = getattr(module, "input_quant", None)
        prefix = min(quantizer.fp_prefix, seq_len) if quantizer is not None else 0  # what the module really keeps
        macs += per_token * seq_len
        ops += _linear_ops(per_token, seq_len, bits[0], bits[1], prefix)
    # stock fused experts (an unquantized model): top_k experts per token at 16 bits; the routers too
    n = sum(3 * hidden * inner for _, _, hidden, inner in moe.stock) * moe.top_k * seq_len + moe.router_macs * seq_len
    macs, ops = macs + n, ops + n * 16 * 16
    attn_macs, attn_ops = _attention_ops(model.config, scheme, seq_len)
    return OpsCount(macs=round(macs) + attn_macs, ops=round(ops + attn_ops), seq_len=seq_len)


def _attention_ops(config, scheme: Scheme | None, seq_len: int) -> tuple[int, int]:
    """MACs and OPs of Q K^T and P V (causal) over all layers, queries at 16 bits; the products
    with a full-precision prefix token's key or value at 16 x 16."""
    per_pair = config.num_hidden_layers * config.num_attention_heads * head_dim(config)
    per_matmul = per_pair * seq_len * (seq_len + 1) // 2
    p = _prefix_tokens(scheme, seq_len)
    prefix = per_pair * (p * seq_len - p * (p - 1) // 2)  # key j is read by the seq_len - j queries at and after it
    k_bits = _bits(scheme.keys if scheme else None)
    v_bits = _bits(scheme.values if scheme else None)
    ops = sum((per_matmul - prefix) * 16 * bits + prefix * 16 * 16 for bits in (k_bits, v_bits))
    return 2 * per_matmul, ops


def scheme_cost(model: nn.Module, scheme: Scheme | str | None, seq_len: int, contexts=(2048, 8192, 32768)) -> dict:
    """Size, OPs and KV-cache memory `scheme` would give this (unquantized) model, without quantizing it.

    Counts exactly what `quantize_model` does: every decoder linear (and lm_head if the scheme
    says so) at the scheme's bits, everything else at 16 bits."""
    scheme = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    spec = get_arch(model)
    moe = _moe_parts(model, spec)
    quantized: dict[int, tuple[nn.Module, QuantArgs | None, QuantArgs | None]] = {}
    quantizes = scheme is not None and (scheme.weights is not None or scheme.inputs is not None)
    w, a = (scheme.weights, scheme.inputs) if quantizes else (None, None)
    if quantizes:
        for layer in decoder_layers(model, spec):
            for name in layer_linear_names(layer, spec):
                try:
                    linear = get_module(layer, name)
                except AttributeError:  # an expert inside stock fused parameters: counted below
                    continue
                quantized[id(linear)] = (linear, scheme.weights, scheme.inputs)
        if scheme.quantize_lm_head:
            head = get_module(model, spec.lm_head)
            quantized[id(head)] = (head, scheme.weights, scheme.inputs)
    size = macs = ops = 0
    fused = {id(getattr(m, p)) for m, *_ in moe.stock for p in (spec.moe.gate_up, spec.moe.down)}
    for _, n, hidden, inner in moe.stock:  # each expert's gate, up [inner, hidden] and down [hidden, inner]
        size += n * (2 * _weight_bytes(inner, hidden, w) + _weight_bytes(hidden, inner, w))
        expert_macs = 3 * hidden * inner * moe.top_k * seq_len
        macs += expert_macs
        ops += expert_macs * _bits(w) * _bits(a)
    macs += moe.router_macs * seq_len
    ops += moe.router_macs * seq_len * 16 * 16
    weights = {id(m.weight): mw for m, mw, _ in quantized.values() if mw is not None}
    tied_head = (
        scheme is not None and scheme.quantize_lm_head and id(get_module(model, spec.lm_head).weight) == id(get_module(model, spec.embed).weight)
    )
    seen = set()
    for param in model.parameters():
        if storage_key(param) in seen or id(param) in fused:
            continue
        seen.add(storage_key(param))
        pw = weights.get(id(param))
        size += param.numel() * 2 if pw is None else quantized_weight_bytes(param.shape[0], param.shape[1], pw)
    if tied_head:  # quantize_model unties the head: the embeddings stay at 16 bits beside it
        size += get_module(model, spec.embed).weight.numel() * 2
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        _, lw, la = quantized.get(id(module), (module, None, None))
        per_token = module.in_features * module.out_features * moe.active.get(id(module), 1)
        macs += per_token * seq_len
        ops += _linear_ops(per_token, seq_len, _bits(lw), _bits(la), _prefix_tokens(scheme, seq_len) if la is not None else 0)
    attn_macs, attn_ops = _attention_ops(model.config, scheme, seq_len)
    return {
        "scheme": scheme.name if scheme else "FP16",
        "size_bytes": size,
        "ops": round(ops + attn_ops),
        "macs": round(macs) + attn_macs,
        "ops_seq_len": seq_len,
        "kv_cache_bytes": {str(c): kv_cache_bytes(model.config, scheme, c) for c in contexts},
    }


def _weight_bytes(rows: int, cols: int, args: QuantArgs | None) -> int:
    return rows * cols * 2 if args is None else quantized_weight_bytes(rows, cols, args)


def kv_cache_bytes(config, scheme: Scheme | None, context: int, batch: int = 1) -> int:
    """Bytes of the keys and values of `batch` sequences of `context` tokens (the first
    `scheme.fp_prefix` tokens of each at 16 bits)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = head_dim(config)
    per_token = config.num_hidden_layers * kv_heads * batch  # head_dim vectors per K and per V
    exact = per_token * _prefix_tokens(scheme, context)  # full-precision prefix vectors
    vectors = per_token * context - exact  # quantized ones
    total = 0
    for args in (scheme.keys, scheme.values) if scheme else (None, None):
        if args is None:
            total += (vectors + exact) * dim * 2
        else:
            total += exact * dim * 2
            scales = 1 if args.granularity is Granularity.TENSOR else vectors * scale_count(1, dim, args)
            global_scales = {"token": vectors, "tensor": 1}.get(args.global_scale, 0)
            total += quantized_nbytes(vectors * dim, scales, args, global_scales)
    return total
