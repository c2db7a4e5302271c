"""The ahead-of-time compile check (kernels/compile_check.py) without a GPU: the full matrix the CLI runs
(bf16, fp16, fp32 x sm_80, sm_90, with every attention tuning candidate), and the attention candidates of a
99 KB-shared-memory part (sm_86)."""
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


def test_attention_candidates_fit_sm86(capfd):
    """sm_86/sm_89 (A10, L4, RTX) have 99 KB of shared memory per block: their candidate lists must fit it."""
    rc = compile_check.main(["--arch", "sm_86", "--dtypes", "bf16,fp16", "--kernels", "prefill,decode_split"])
    out = capfd.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if "sm_86" in line]
    assert len(rows) >= 10 and all(r.rstrip().endswith("ok") for r in rows), out


def test_every_tuning_candidate_is_compiled():
    import torch

    from qwen2_triton.kernels import launch

    def compiled(cap, kernel, rows):
        return {(dict(v.constexprs)[rows], dict(v.constexprs)["BLOCK_N"], dict(v.constexprs)["HEAD_DIM"],
                 v.num_warps, v.num_stages) for v in compile_check.variants(["bf16"], cap) if v.kernel.endswith(kernel)}

    for cap in (80, 86, 90):
        for d in (64, 128):
            assert {(c.BLOCK_M, c.BLOCK_N, d, c.num_warps, c.num_stages)
                    for c in launch.prefill_candidates(d, torch.bfloat16, cap)} <= compiled(cap, "prefill_kernel", "BLOCK_M")
            assert {(c.BLOCK_M, c.BLOCK_N, d, c.num_warps, c.num_stages)
                    for c in launch.decode_candidates(d, torch.bfloat16, 7, cap)} <= compiled(cap, "decode_split_kernel", "BLOCK_G")


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
