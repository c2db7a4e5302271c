"""The GGUF weight-only kernel's variants for kernels/compile_check.py (issue 11), captured from its real launcher.

A handful, to keep the check's time small: each type's constexpr set (Q8_0: 8-bit words; Q5_0: a 1-bit high plane;
Q4_0: neither; Q5_1, Q4_1: an added fp16 min, with and without the high plane; Q4_K: the min path; Q5_K: the min
path and a high plane; Q6_K: a 2-bit high plane and 16-row scales) at batch-1 decode (split-K; M=1 is a Triton
constant), a 32-row small step (split-K, 32-row tiles; SMALL_STEP_TYPES) and a 256-row prefill, in bf16; fp16 for Q4_K,
with the most live tiles of the demo's types (scales, d, mins). K-quants at Qwen2-7B's down_proj (K 18944 = 74
super-blocks: every Qwen2 K-quant K is a multiple of 256, so the specialisation is the same); the 32-value block
types at Qwen2-0.5B's qkv (K 896, a bias), the demo model's own layout. The embedding lookup
(kernels/gguf_embedding.py) of every type, in bf16, for 1, 8 and 16 tokens.
"""
from __future__ import annotations

GGUF_SHAPES = {"Q4_K": (18944, 3584, False), "Q5_K": (18944, 3584, False), "Q6_K": (18944, 3584, False),  # K, N, bias
               "Q5_0": (896, 1152, True), "Q8_0": (896, 1152, True), "Q4_0": (896, 1152, True),
               "Q5_1": (896, 1152, True), "Q4_1": (896, 1152, True)}
GGUF_DTYPES = {"bf16": ("Q8_0", "Q5_0", "Q4_0", "Q5_1", "Q4_1", "Q4_K", "Q5_K", "Q6_K"), "fp16": ("Q4_K",)}
# The tuning candidates (gguf_candidates) beyond the heuristic: Q4_K and Q5_K (scales, d and mins live per tile;
# Q5_K a high plane too) and Q6_K (two planes, 16-row scales) in bf16, the types with the most registers.
CANDIDATE_TYPES = {"bf16": ("Q4_K", "Q5_K", "Q6_K")}
# the 32-row tiles: the K-quants (the most registers), Q8_0 (8-bit words) and Q5_1 (a plane and an added min)
SMALL_STEP_TYPES = ("Q8_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def gguf_variants(dtypes, cap: int | None = None) -> list:
    import torch

    from qwen2_triton.kernels.compile_check import _capture, _dedupe
    from qwen2_triton.kernels.compile_check_quant import QUANT_SM_COUNT, quant_tile
    from qwen2_triton.kernels.gguf_embedding import gguf_embedding
    from qwen2_triton.kernels.gguf_linear import FORMATS, GGUFWeight, gguf_candidates, gguf_linear

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}
    out: list = []
    for dt in dtypes:
        for qtype in GGUF_DTYPES.get(dt, ()):
            f = FORMATS[qtype]
            k, n, bias = GGUF_SHAPES[qtype]
            w = GGUFWeight(qtype, **{name: None if spec is None else torch.empty(spec[0], n, dtype=spec[1])
                                     for name, spec in f.field_rows(k).items()}, in_features=k, out_features=n)
            for cp in [cap] if cap is not None else sorted(QUANT_SM_COUNT):
                for t in (1, 8, 16) if dt == "bf16" else ():  # the table lookup (kernels/gguf_embedding.py): one
                    ids = torch.empty(t, dtype=torch.int64)  # token (T=1 is a Triton constant), a few, 16 ('D')
                    _capture(out, ["gguf_embedding:gguf_embedding_kernel"], f"{dt} {qtype} embedding T={t} K={k}",
                             lambda: gguf_embedding(ids, w, torch.bfloat16))
                for m in ((1, 32, 256) if qtype in SMALL_STEP_TYPES else (1, 256)):
                    x = torch.empty(m, k, dtype=tdt[dt])
                    b = torch.empty(n, dtype=tdt[dt]) if bias else None
                    sm = QUANT_SM_COUNT.get(cp, 132)
                    _capture(out, ["gguf_linear:gguf_linear_kernel"], f"{dt} {qtype} M={m} K={k}",
                             lambda: gguf_linear(x, w, b, sm_count=sm))
                    if qtype in CANDIDATE_TYPES.get(dt, ()):
                        for cfg in gguf_candidates(m, n, k, tdt[dt], sm)[1:]:
                            _capture(out, ["gguf_linear:gguf_linear_kernel"],
                                     f"{dt} {qtype} M={m} K={k} cand={quant_tile(cfg)}",
                                     lambda: gguf_linear(x, w, b, sm_count=sm, config=cfg))
    return _dedupe(out)
