"""Which activation grid vLLM's CPU int8 kernels use: quantize the same bfloat16 activations with
vLLM's op (`onednn_scaled_int8_quant`, dynamic per token) and compare its scales and codes with
scale max|x|/127 (lowbit's A8) and max|x|/127.5 (A8f), codes round(x / s) and round(x * (1 / s));
then its oneDNN int8 GEMM against the float32 product of the dequantized operands. Runs in vLLM's
environment (setup_vllm.sh), never imports lowbit.

    benchmarks/.venvs/vllm/bin/python benchmarks/engines/vllm_int8_probe.py
"""

import torch
from vllm import _custom_ops as ops


def main() -> None:
    torch.manual_seed(0)
    x = (torch.randn(64, 576) * torch.rand(64, 1) * 5).bfloat16()
    x[3, 7] = 300.0  # an outlier token
    x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    amax = x.float().abs().amax(1, keepdim=True)
    print(f"{x_q.numel()} codes, {x_s.numel()} token scales")
    for name, s in (("max/127 (A8)", amax / 127), ("max/127.5 (A8f)", amax / 127.5)):
        divided = torch.clamp(torch.round(x.float() / s), -128, 127)
        multiplied = torch.clamp(torch.round(x.float() * (1 / s)), -128, 127)
        print(
            f"{name:16s} scales equal: {torch.equal(x_s.reshape(-1, 1), s)}; codes differing from round(x/s): "
            f"{int((x_q.float() != divided).sum())}, from round(x*(1/s)): {int((x_q.float() != multiplied).sum())}"
        )
    n, k = 192, 576
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    w_s = torch.rand(n, 1) * 0.01 + 0.001
    handler = ops.create_onednn_scaled_mm(w_q.t(), w_s.reshape(-1), torch.bfloat16, True, False, 32)
    out = torch.empty((64, n), dtype=torch.bfloat16)
    ops.onednn_scaled_mm(handler, x_q, out, x_s, None, None, None)
    ref = (x_q.float() * x_s.reshape(-1, 1)) @ (w_q.float() * w_s).t()
    rel = ((out.float() - ref).abs() / ref.abs().clamp(min=1e-3)).max().item()
    print(f"int8 GEMM (bf16 out) vs float32 product of the dequantized operands: max relative difference {rel:.4f} (bf16 step 0.0039)")


if __name__ == "__main__":
    main()
