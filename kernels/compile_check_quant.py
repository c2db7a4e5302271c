"""The GPTQ/AWQ weight-only kernel's variants for kernels/compile_check.py (issue 11), captured from its real
launcher.

kernels/quant_linear.py through its launcher: the four projections of Qwen2-0.5B and 7B (between them every
specialisation the 1.5B and 4B shapes give: N, K and the group all divisible by 16, one or several K tiles per
split) at batch-1 decode (M=1 is a Triton constant), a 4-row decode for 7B, a 32-row small step (split-K with
32-row tiles) for 7B in bf16 (fp16 tiles take the same registers) and a 256-row prefill; int4 / int8, constant
(symmetric) or loaded zeros, int4 with the act-order permutation. The split count depends on the SM count, so
each arch is captured at its part's: A100 108, H100 132.
"""
from __future__ import annotations

QUANT_SHAPES = ((896, 4864, 14, 2, 64), (3584, 18944, 28, 4, 128))  # hidden, intermediate, heads, kv heads, head_dim
QUANT_SM_COUNT = {80: 108, 90: 132}


def quant_variants(dtypes, cap: int | None = None) -> list:
    import torch

    from qwen2_triton.kernels.compile_check import _capture, _dedupe
    from qwen2_triton.kernels.quant_linear import quant_candidates, quant_linear

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out: list = []
    for dt in dtypes:
        for cp in [cap] if cap is not None else sorted(QUANT_SM_COUNT):
            for hidden, inter, hq, hk, d in QUANT_SHAPES:
                for k, n, bias in ((hidden, (hq + 2 * hk) * d, True), (hq * d, hidden, False),
                                   (hidden, 2 * inter, False), (inter, hidden, False)):
                    for m in ((1, 4, 256) + ((32,) if dt == "bf16" else ()) if hidden == 3584 else (1, 256)):
                        for bits, sym, act in ((4, True, False), (4, False, False), (4, False, True),
                                               (8, True, False)):  # int8 asym: int4 asym's code, BITS=8
                            w = _empty_quant_weight(k, n, bits, sym, act)
                            x = torch.empty(m, k, dtype=tdt[dt])
                            b = torch.empty(n, dtype=tdt[dt]) if bias else None
                            label = f"{dt} int{bits} {'sym' if sym else 'asym'}{' perm' if act else ''} M={m}"
                            _capture(out, ["quant_linear:quant_linear_kernel"], label,
                                     lambda: quant_linear(x, w, b, sm_count=QUANT_SM_COUNT.get(cp, 132)))
    # The tuning candidates beyond the heuristic (quant_candidates), kept to a few compiles: bf16, the 7B qkv
    # (bias) and down_proj, int4 with loaded zeros and act-order (the most live values) and int8 (the widest
    # words); fp16 tiles take the same registers.
    for cp in ([cap] if cap is not None else sorted(QUANT_SM_COUNT)) if "bf16" in dtypes else ():
        sm = QUANT_SM_COUNT.get(cp, 132)
        for k, n, bias in ((3584, 4608, True), (18944, 3584, False)):
            for m in (1, 32, 256):
                for bits, sym, act in ((4, False, True), (8, True, False)):
                    w = _empty_quant_weight(k, n, bits, sym, act)
                    x = torch.empty(m, k, dtype=torch.bfloat16)
                    b = torch.empty(n, dtype=torch.bfloat16) if bias else None
                    for cfg in quant_candidates(m, n, k, 128, torch.bfloat16, sm)[1:]:
                        label = f"bf16 int{bits} {'sym' if sym else 'asym'}{' perm' if act else ''} M={m} " \
                                f"cand={quant_tile(cfg)}"
                        _capture(out, ["quant_linear:quant_linear_kernel"], label,
                                 lambda: quant_linear(x, w, b, sm_count=sm, config=cfg))
    return _dedupe(out)


def quant_tile(cfg) -> str:
    """16x64x128w4s3: a QuantConfig's BLOCK_M x BLOCK_N x BLOCK_K, warps, stages (SPLIT_K is a grid size)."""
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}w{cfg.num_warps}s{cfg.num_stages}"


def _empty_quant_weight(k: int, n: int, bits: int, sym: bool, act: bool, group: int = 128):
    import torch

    from qwen2_triton.kernels.quant_linear import QuantWeight

    g = k // group
    return QuantWeight(torch.empty(k * bits // 32, n, dtype=torch.int32), torch.empty(g, n, dtype=torch.float16),
                       None if sym else torch.empty(g, n, dtype=torch.float16), 2 ** (bits - 1) if sym else -1,
                       torch.empty(k, dtype=torch.int32) if act else None, bits, group, k, n)
