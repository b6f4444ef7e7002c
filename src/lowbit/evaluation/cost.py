"""Size, OPs and KV-cache memory of a (quantized) model.

Conventions (stated in every report):
- size: quantized weights packed at their bit width, plus one fp16 scale per row or group (and
  one fp16 offset for asymmetric); every other parameter (embeddings, norms, unquantized
  linears) at 16 bits; tied tensors counted once.
- OPs (LLM-QAT): MACs x W_bits x A_bits for every linear layer including lm_head, plus the two
  attention matmuls (Q K^T and P V, causal) at 16 x KV bits, for one sequence of `seq_len` tokens.
- KV cache: keys and values of every layer at their bit width plus one fp16 scale per token and
  head (and offset if asymmetric), for a full (not sliding-window) cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..arch import head_dim
from ..quant import packed_nbytes
from ..runtime.linear import QuantLinear
from ..scheme import Granularity, QuantArgs, Scheme

SCALE_BYTES = 2  # fp16


def scale_count(rows: int, cols: int, args: QuantArgs) -> int:
    if args.granularity is Granularity.TENSOR:
        return 1
    if args.granularity is Granularity.GROUP:
        return rows * cols // args.group_size
    return rows


def quantized_weight_bytes(rows: int, cols: int, args: QuantArgs) -> int:
    per_scale = SCALE_BYTES * (1 if args.symmetric else 2)
    return packed_nbytes(rows * cols, args.bits) + scale_count(rows, cols, args) * per_scale


def model_size_bytes(model: nn.Module) -> int:
    quantized = {}
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_args is not None:
            quantized[id(module.weight)] = quantized_weight_bytes(module.out_features, module.in_features, module.weight_args)
    total, seen = 0, set()
    for param in model.parameters():
        key = param.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += quantized.get(id(param), param.numel() * 2)
    return total


@dataclass
class OpsCount:
    macs: int
    ops: int  # MACs x W_bits x A_bits
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_ops(model: nn.Module, scheme: Scheme | None, seq_len: int) -> OpsCount:
    macs = ops = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            w = module.weight_args.bits if module.weight_args else 16
            a = module.input_quant.args.bits if module.input_quant else 16
            n = module.in_features * module.out_features * seq_len
        elif isinstance(module, nn.Linear):
            w = a = 16
            n = module.in_features * module.out_features * seq_len
        else:
            continue
        macs += n
        ops += n * w * a
    config = model.config
    per_matmul = config.num_hidden_layers * config.num_attention_heads * head_dim(config) * seq_len * (seq_len + 1) // 2
    k_bits = scheme.k_bits if scheme else 16
    v_bits = scheme.v_bits if scheme else 16
    macs += 2 * per_matmul
    ops += per_matmul * 16 * k_bits + per_matmul * 16 * v_bits
    return OpsCount(macs=macs, ops=ops, seq_len=seq_len)


def kv_cache_bytes(config, scheme: Scheme | None, context: int, batch: int = 1) -> int:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = head_dim(config)
    vectors = config.num_hidden_layers * kv_heads * context * batch  # per K and per V
    total = 0
    for args in ((scheme.keys, scheme.values) if scheme else (None, None)):
        if args is None:
            total += vectors * dim * 2
        else:
            per_scale = SCALE_BYTES * (1 if args.symmetric else 2)
            scales = 1 if args.granularity is Granularity.TENSOR else vectors * scale_count(1, dim, args)
            total += packed_nbytes(vectors * dim, args.bits) + scales * per_scale
    return total
