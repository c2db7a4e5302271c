"""The ahead-of-time compile check (kernels/compile_check.py) without a GPU: the full matrix the CLI runs
(bf16, fp16, fp32 x sm_80, sm_90, with every attention tuning candidate), the attention candidates of a
99 KB-shared-memory part (sm_86), the facts read off the compiled code (kernels/compiled_facts.py), and the
rejection of a tile whose warpgroups duplicate the QK^T."""
import re

import pytest
import torch

from qwen2_triton.kernels import compile_check, compiled_facts, launch

KERNELS = ("rms_norm_kernel", "swiglu_kernel", "rotary_kernel", "store_kv_kernel", "rotary_store_kv_kernel",
           "prefill_kernel", "decode_split_kernel", "decode_merge_kernel")


def _rows(out):
    return [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in KERNELS]


def test_compile_check_sm80_sm90(capfd):
    rc = compile_check.main(["--arch", "sm_80,sm_90"])
    out = capfd.readouterr().out
    assert rc == 0, out
    rows = _rows(out)
    assert {r.split()[0] for r in rows} == set(KERNELS)
    assert all(r.rstrip().endswith("ok") for r in rows), out
    assert {"sm_80", "sm_90"} <= {tok for r in rows for tok in r.split()}
    # the report's compiled-code facts: sm_90 prefill runs on wgmma with 64 useful rows per warpgroup, the
    # attention tiles stream K/V with 16-byte cp.async, and every row has a resident-programs figure
    pre90 = [r for r in rows if r.startswith("prefill_kernel") and " sm_90 " in r and " bf16 " in r]
    assert pre90 and all(" wgmma " in r and "64/wg" in r for r in pre90), out
    assert all("16 ld+cp.async" in r for r in rows if r.startswith(("prefill_kernel", "decode_split_kernel"))
               and " fp32 " not in r), out
    for r in rows:  # the column after "spill st/ld": resident programs per SM, at least one
        toks = r.split()
        spill = next(i for i, t in enumerate(toks) if re.fullmatch(r"-?\d+/-?\d+", t))
        assert int(toks[spill + 1]) >= 1, r


def test_attention_candidates_fit_sm86(capfd):
    """sm_86/sm_89 (A10, L4, RTX) have 99 KB of shared memory per block: their candidate lists must fit it."""
    rc = compile_check.main(["--arch", "sm_86", "--dtypes", "bf16,fp16", "--kernels", "prefill,decode_split"])
    out = capfd.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if "sm_86" in line]
    assert len(rows) >= 10 and all(r.rstrip().endswith("ok") for r in rows), out


def test_duplicated_qk_config_is_rejected(capfd):
    """64x64 tiles with 8 warps on sm_90: both warpgroups compute the same 64 rows of QK^T (warpsPerCTA [8, 1])
    -> DUP-ROWS and a failing exit status, while the sm_90 default, 128x64 with 8 warps, has 64 rows per
    warpgroup (on sm_80, mma.sync at 16 rows per warp, 64x64w8s2 is the default: the full matrix above)."""
    dup = launch.AttnConfig(64, 64, 8, 2)
    assert launch.duplicates_rows(dup, 90) and not launch.duplicates_rows(dup, 80)
    assert dup not in launch.prefill_candidates(128, torch.bfloat16, 90)
    rc = compile_check.main(["--arch", "sm_90", "--dtypes", "bf16", "--kernels", "prefill",
                             "--extra-prefill", "64x64w8s2"])
    out = capfd.readouterr().out
    assert rc == 1, out
    rows = [r for r in out.splitlines() if r.startswith("prefill_kernel") and " D=128 G=7 " in r]
    bad = [r for r in rows if "64x64w8s2" in r and " sm_90 " in r]
    assert len(bad) == 1 and " wgmma " in bad[0] and "32/wg" in bad[0] and "DUP-ROWS" in bad[0], out
    assert all(r.rstrip().endswith("ok") for r in rows if r not in bad), out
    default = launch.prefill_config(128, torch.bfloat16, 90)
    assert any(compile_check._tile(default) in r and " sm_90 " in r and "64/wg" in r for r in rows), out
    with pytest.raises(ValueError, match="BLOCK_MxBLOCK_N"):
        compile_check.parse_tile("64x64")


def test_runtime_specialisation_is_compiled():
    """Ints specialise as at launch: divisible by 16 (n_cols 896) -> tt.divisibility, equal to 1 (the decode
    grid cap at large batch, the GQA group of an MHA model) -> a constant."""
    vs = compile_check.variants(["bf16"], 90)
    rms = [v for v in vs if v.kernel.endswith("rms_norm_kernel")]
    assert all("n_cols" in v.aligned for v in rms)
    dec = [v for v in vs if v.kernel.endswith("decode_split_kernel")]
    assert any(dict(v.constexprs).get("max_splits") == 1 for v in dec)
    assert any("max_splits" in v.aligned for v in dec)  # 64: divisible
    assert any(dict(v.constexprs).get("group") == 1 for v in dec)  # Qwen1.5-4B


def test_every_tuning_candidate_is_compiled():
    def compiled(cap, kernel, rows):
        return {(dict(v.constexprs)[rows], dict(v.constexprs)["BLOCK_N"], dict(v.constexprs)["HEAD_DIM"],
                 v.num_warps, v.num_stages) for v in compile_check.variants(["bf16"], cap) if v.kernel.endswith(kernel)}

    for cap in (80, 86, 90):
        for d in (64, 128):
            assert {(c.BLOCK_M, c.BLOCK_N, d, c.num_warps, c.num_stages)
                    for c in launch.prefill_candidates(d, torch.bfloat16, cap)} <= compiled(cap, "prefill_kernel", "BLOCK_M")
            assert {(c.BLOCK_M, c.BLOCK_N, d, c.num_warps, c.num_stages)
                    for c in launch.decode_candidates(d, torch.bfloat16, 7, cap)} <= compiled(cap, "decode_split_kernel", "BLOCK_G")
    sm90 = {(c.BLOCK_M, c.BLOCK_N, c.num_warps) for c in launch.prefill_candidates(128, torch.bfloat16, 90)}
    assert {(128, 64, 8), (128, 128, 8)} <= sm90


def test_every_variant_of_each_kernel_is_listed():
    """Both residual flags, both head dims, every merge width, all three dtypes are in the matrix."""
    vs = compile_check.variants(["bf16", "fp16", "fp32"])
    consts = lambda name: [dict(v.constexprs) for v in vs if v.kernel.endswith(name)]  # noqa: E731
    assert {c["HAS_RESIDUAL"] for c in consts("rms_norm_kernel")} == {False, True}
    assert {c["HEAD_DIM"] for c in consts("prefill_kernel")} == {64, 128}
    assert {c["BLOCK_S"] for c in consts("decode_merge_kernel")} == {2, 4, 8, 16, 32, 64, 128}
    assert {v.label.split()[0] for v in vs} == {"bf16", "fp16", "fp32"}


def test_problem_rows_make_the_check_fail():
    ok = dict(kernel="k", label="bf16", arch="sm_80", regs=64, stack=0, shared=1024, spill_st=0, spill_ld=0,
              rows="64/wg", dup=False, error="")
    assert compile_check.problems(ok) == ""
    assert compile_check.problems({**ok, "spill_st": 8, "spill_ld": 8}) == "SPILL"
    assert compile_check.problems({**ok, "stack": 16}) == "SPILL"
    assert compile_check.problems({**ok, "shared": 200_000}).startswith("SHARED>")
    assert compile_check.problems({**ok, "dup": True, "rows": "32/wg"}).startswith("DUP-ROWS")
    assert compile_check.problems({**ok, "error": "CompilationError: x"}) == "CompilationError: x"


# ------------------------------------------------------------------------------------ compiled_facts
TTGIR = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 4], instrShape = [16, 8]}>
    %qk = ttng.warp_group_dot %q, %k, %c {isAsync = true} : tensor<64x128xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * !ttg.memdesc<128x64xbf16, #shared> -> tensor<64x64xf32, #mma>
    %pv = ttng.warp_group_dot %p, %v, %a {isAsync = true} : tensor<64x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1}>> * !ttg.memdesc<64x128xbf16, #shared> -> tensor<64x128xf32, #mma1>
    %d = tt.dot %x, %y, %z : tensor<16x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma2}>> * tensor<64x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma2}>> -> tensor<16x64xf32, #mma2>
"""


def test_dot_rows_read_off_the_layouts():
    qk, pv, small = compiled_facts.dot_rows(TTGIR)
    assert (qk.rows, qk.warp_rows, qk.duplicated, qk.describe()) == (64, 128, True, "32/wg")
    assert (pv.duplicated, pv.describe()) == (False, "64/wg")
    assert (small.duplicated, small.describe()) == (False, "16/w")


def test_mma_kind_widest_load_and_occupancy():
    ptx = ("\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n\tld.global.b16 %rs1, [ %rd2 + 0 ];\n"
           "\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;\n"
           "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n")
    assert compiled_facts.widest_load(ptx) == (16, "ld+cp.async")
    assert compiled_facts.widest_load("\tld.global.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];\n") == (8, "ld")
    assert compiled_facts.widest_load("") == (0, "-")
    assert compiled_facts.mma_kind(ptx, "") == "wgmma"
    assert compiled_facts.mma_kind("mma.sync.aligned.m16n8k16", "") == "mma.sync"
    assert compiled_facts.mma_kind("fma.rn.f32", "tt.dot %a") == "fma"
    assert compiled_facts.mma_kind("", "") == "-"
    # 8 warps x 192 registers: 49152 registers of 65536 -> 1 program; 4 warps x 64 with 20 KB shared -> 8
    assert compiled_facts.programs_per_sm(90, 192, 98304, 8) == 1
    assert compiled_facts.programs_per_sm(90, 64, 20480, 4) == 8
    assert compiled_facts.programs_per_sm(86, 64, 20480, 4) == 4  # 100 KB per SM
