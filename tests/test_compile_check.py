"""The ahead-of-time compile check (kernels/compile_check.py) without a GPU: the full matrix the CLI runs
(bf16, fp16, fp32 x sm_80, sm_90: 270 compiles, 40-90 s on 2 busy cores)."""
from qwen2_triton.kernels import compile_check

KERNELS = ("rms_norm_kernel", "swiglu_kernel", "rotary_kernel", "store_kv_kernel", "prefill_kernel",
           "decode_split_kernel", "decode_merge_kernel")


def test_compile_check_sm80_sm90(capfd):
    rc = compile_check.main(["--arch", "sm_80,sm_90"])
    out = capfd.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in KERNELS]
    assert {r.split()[0] for r in rows} == set(KERNELS)
    assert all(r.rstrip().endswith("ok") for r in rows), out
    assert {"sm_80", "sm_90"} <= {tok for r in rows for tok in r.split()}


def test_every_variant_of_each_kernel_is_listed():
    """Both residual flags, both head dims, every merge width, all three dtypes are in the matrix."""
    vs = compile_check.variants(["bf16", "fp16", "fp32"])
    consts = lambda name: [dict(v.constexprs) for v in vs if v.kernel.endswith(name)]  # noqa: E731
    assert {c["HAS_RESIDUAL"] for c in consts("rms_norm_kernel")} == {False, True}
    assert {c["HEAD_DIM"] for c in consts("prefill_kernel")} == {64, 128}
    assert {c["BLOCK_S"] for c in consts("decode_merge_kernel")} == {1, 2, 4, 8, 16, 32, 64}
    assert {v.label.split()[0] for v in vs} == {"bf16", "fp16", "fp32"}


def test_problem_rows_make_the_check_fail():
    ok = dict(kernel="k", label="bf16", arch="sm_80", regs=64, stack=0, shared=1024, spill_st=0, spill_ld=0, error="")
    assert compile_check._problems(ok) == ""
    assert compile_check._problems({**ok, "spill_st": 8, "spill_ld": 8}) == "SPILL"
    assert compile_check._problems({**ok, "stack": 16}) == "SPILL"
    assert compile_check._problems({**ok, "shared": 200_000}).startswith("SHARED>")
    assert compile_check._problems({**ok, "error": "CompilationError: x"}) == "CompilationError: x"
