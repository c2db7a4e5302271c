"""The GGUF kernel's variants in the compile check (kernels/compile_check_gguf.py), compiled for sm_80 and sm_90
without a GPU: no spills, and the PTX really has FP fusion off (Q4_K's d*sc*q - dmin*m as a multiply and a
subtract, not an fma: rounded as gguf.quants rounds it, which the interpreter tests cannot see)."""
import glob
import os

from qwen2_triton.kernels import compile_check
from qwen2_triton.kernels.gguf_linear import FORMATS
from qwen2_triton.kernels.compile_check_gguf import gguf_variants


def test_variants_cover_every_type_with_fusion_off():
    vs = gguf_variants(["bf16", "fp16", "fp32"], 90)
    labels = {v.label for v in vs}
    assert labels == {f"bf16 {q} M={m} K=896" for q in ("Q8_0", "Q5_0", "Q4_0", "Q5_1", "Q4_1") for m in (1, 256)} | \
        {f"bf16 {q} M=32 K=896" for q in ("Q8_0", "Q5_1")} | \
        {f"bf16 {q} M={m} K=18944" for q in ("Q4_K", "Q5_K", "Q6_K") for m in (1, 32, 256)} | \
        {f"fp16 Q4_K M={m} K=18944" for m in (1, 32, 256)} | \
        {f"bf16 {q} M={m} K=18944 cand={t}" for q in ("Q4_K", "Q5_K", "Q6_K")  # tuning candidates past the default
         for m, tiles in ((1, ("16x128x128w8s3", "16x64x64w4s4")), (32, ("32x64x64w4s3",)),
                          (256, ("128x128x64w8s3", "64x64x64w4s3")))
         for t in tiles} | \
        {f"bf16 {q} embedding T={t} K={896 if FORMATS[q].super_rows == 0 else 18944}" for q in FORMATS
         for t in (1, 8, 16)}
    assert all(dict(v.options) == {"enable_fp_fusion": False} for v in vs)


def test_gguf_variants_compile_without_spills(capfd, tmp_path):
    rc = compile_check.main(["--arch", "sm_80,sm_90", "--kernels", "gguf", "--dtypes", "bf16,fp16",
                             "--dump", str(tmp_path)])
    out = capfd.readouterr().out
    assert rc == 0, out
    rows = [r for r in out.splitlines() if r.startswith("gguf_linear_kernel")]
    assert len(rows) == 78 and all(r.rstrip().endswith("ok") for r in rows), out
    lookups = [r for r in out.splitlines() if r.startswith("gguf_embedding_kernel")]
    assert len(lookups) == 2 * 3 * len(FORMATS) and all(r.rstrip().endswith("ok") for r in lookups), out
    q4k = glob.glob(os.path.join(tmp_path, "gguf_linear_kernel_*Q4_K*.ptx"))
    assert len(q4k) == 22  # the default and candidate tiles at M=1, 32 and 256, bf16 and fp16, two archs
    q5k = glob.glob(os.path.join(tmp_path, "gguf_linear_kernel_*Q5_K*.ptx"))
    assert len(q5k) == 16  # the same in bf16: Q5_K's min path is Q4_K's
    for path in q4k + q5k:
        with open(path) as f:
            ptx = f.read()
        assert "fma.rn.f32" not in ptx and "sub.rn.f32" in ptx, path  # fusion on: 64 fma, no sub (M=1, sm_90)
    added_min = glob.glob(os.path.join(tmp_path, "gguf_linear_kernel_*Q[45]_1*.ptx"))
    assert len(added_min) == 10  # Q5_1 and Q4_1's d * q + m at M=1 and 256, Q5_1's at 32, two archs
    for path in added_min:
        with open(path) as f:
            assert "fma.rn.f32" not in f.read(), path
