"""Ahead-of-time compile check, no GPU needed: every kernel variant x every launch config kernels/launch.py can
select for Qwen2 shapes, compiled for each requested arch, with registers, shared memory and spills.

    python -m qwen2_triton.kernels.compile_check --arch sm_80,sm_90 [--dtypes bf16,fp16,fp32] [--kernels rms,...]

Each variant goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``; the cubin is
read with the cuobjdump shipped in triton/backends/nvidia/bin (``-res-usage``: registers, stack frame), spill
stores/loads come from the ``ptxas -v`` log of Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG, a fresh cache so
ptxas runs every time; the same mechanism in triton 3.6 and 3.9), and Triton's metadata gives the dynamic
shared memory. Exit status 1 on any compile error, any spill, or shared memory above the arch's per-block limit.
Under TRITON_INTERPRET=1 the kernels are interpreter wrappers, so ``main`` re-runs itself in a subprocess
without it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from qwen2_triton.kernels.interpreter_compat import interpreter_active

DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# Qwen2 shapes (shared/QWEN2_NOTES.md): hidden, intermediate, (q heads, kv heads, head_dim)
HIDDEN = (896, 1536, 2560, 3584)
INTERMEDIATE = (4864, 6912, 8960, 18944)
ATTN_HEADS = ((14, 2, 64), (12, 2, 128), (28, 4, 128), (20, 20, 128))
GQA_GROUPS = (1, 2, 5, 6, 7, 8)
PAGE = 16  # the runtime's KV block size


@dataclass(frozen=True)
class Variant:
    kernel: str  # "module:function"
    label: str
    signature: tuple  # ((arg, type), ...): pointers "*bf16", scalars "i32"/"fp32", "constexpr"
    constexprs: tuple  # ((arg, value), ...)
    num_warps: int
    num_stages: int = 2
    aligned: tuple = field(default=())  # args known divisible by 16 at run time (pointers, strides)


def _variant(kernel, label, args, consts, num_warps, num_stages=2):
    """args: (name, type) in kernel order; pointers and stride_* args are marked 16-divisible, as Triton's JIT
    specialises them for torch allocations and Qwen2's row widths (all multiples of 16)."""
    sig = tuple(args) + tuple((k, "constexpr") for k, _ in consts)
    aligned = tuple(n for n, t in args if t.startswith("*") or n.startswith("stride_"))
    return Variant(kernel, label, sig, tuple(consts), num_warps, num_stages, aligned)


def variants(dtypes, cap: int | None = None):
    """Every (kernel, constexprs, warps, stages) the runtime can launch on compute capability ``cap``: the
    heuristic configs plus the attention candidates runtime/tuning.py may pick there (None: every arch's)."""
    import torch

    from qwen2_triton.kernels import launch
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = []
    i32 = lambda *names: [(n, "i32") for n in names]  # noqa: E731
    for dt in dtypes:
        p = "*" + dt
        for hidden in HIDDEN:
            cfg = launch.rmsnorm_config(hidden)
            for res in (False, True):
                out.append(_variant("rmsnorm:rms_norm_kernel", f"{dt} H={hidden} res={int(res)}",
                                    [("x_ptr", p), ("res_ptr", p), ("w_ptr", p), ("out_ptr", p), ("res_out_ptr", p)]
                                    + i32("stride_x", "stride_res", "stride_out", "stride_res_out", "n_cols")
                                    + [("eps", "fp32")], [("HAS_RESIDUAL", res), ("BLOCK", cfg.BLOCK)],
                                    cfg.num_warps))
        for inter in INTERMEDIATE:
            cfg = launch.swiglu_config(inter)
            out.append(_variant("swiglu:swiglu_kernel", f"{dt} I={inter}", [("gu_ptr", p), ("out_ptr", p)]
                                + i32("stride_gu", "stride_out", "n_cols"), [("BLOCK", cfg.BLOCK)], cfg.num_warps))
        for hq, hk, d in ATTN_HEADS:
            cq, ck = launch.rotary_config(hq, d), launch.rotary_config(hk, d)
            for pos in ("i32", "i64"):
                out.append(_variant("rotary:rotary_kernel", f"{dt} {hq}/{hk}x{d} pos={pos}",
                                    [("q_ptr", p), ("k_ptr", p), ("pos_ptr", "*" + pos), ("cs_ptr", "*fp32")]
                                    + i32("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_cs",
                                          "n_q_heads", "n_k_heads"),
                                    [("HALF", d // 2), ("BLOCK_HQ", cq.BLOCK), ("BLOCK_HK", ck.BLOCK)],
                                    max(cq.num_warps, ck.num_warps)))
            cfg = launch.store_kv_config(hk, d)
            for cache_dt in dtypes:  # store_kv casts k/v to the cache dtype, so any pair can be selected
                pc = "*" + cache_dt
                out.append(_variant("attention:store_kv_kernel", f"{dt} Hk={hk} D={d} cache={cache_dt}",
                                    [("k_ptr", p), ("v_ptr", p), ("kc_ptr", pc), ("vc_ptr", pc), ("slot_ptr", "*i64")]
                                    + i32("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kcb",
                                          "stride_kcs", "stride_kch", "stride_vcb", "stride_vcs", "stride_vch",
                                          "n_heads", "head_dim"),
                                    [("PAGE", PAGE), ("BLOCK_H", cfg.BLOCK), ("BLOCK_D", d)], cfg.num_warps))
        cache = [("k_ptr", p), ("v_ptr", p)]
        strides_kv = i32("stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_bt")
        for d in (64, 128):
            for cfg in launch.prefill_candidates(d, tdt[dt], cap):
                out.append(_variant("attention_prefill:prefill_kernel", f"{dt} D={d} {_tile(cfg)}",
                                    [("q_ptr", p)] + cache + [("o_ptr", p), ("cu_q_ptr", "*i32"),
                                                              ("seq_lens_ptr", "*i32"), ("bt_ptr", "*i32")]
                                    + i32("stride_qt", "stride_qh", "stride_ot", "stride_oh") + strides_kv
                                    + [("group", "i32"), ("qk_scale", "fp32")],
                                    [("PAGE", PAGE), ("BLOCK_M", cfg.BLOCK_M), ("BLOCK_N", cfg.BLOCK_N),
                                     ("HEAD_DIM", d), ("DOT_PRECISION", cfg.dot_precision)], cfg.num_warps,
                                    cfg.num_stages))
            decode = {c for g in GQA_GROUPS for c in launch.decode_candidates(d, tdt[dt], g, cap)}
            for cfg in sorted(decode, key=str):
                out.append(_variant("attention_decode:decode_split_kernel", f"{dt} D={d} {_tile(cfg)}",
                                    [("q_ptr", p)] + cache + [("po_ptr", "*fp32"), ("plse_ptr", "*fp32"),
                                                              ("cu_q_ptr", "*i32"), ("seq_lens_ptr", "*i32"),
                                                              ("bt_ptr", "*i32")]
                                    + i32("stride_qt", "stride_qh") + strides_kv
                                    + i32("n_q_heads", "group", "num_splits") + [("qk_scale", "fp32")],
                                    [("PAGE", PAGE), ("BLOCK_G", cfg.BLOCK_M), ("BLOCK_N", cfg.BLOCK_N),
                                     ("HEAD_DIM", d), ("DOT_PRECISION", cfg.dot_precision)], cfg.num_warps,
                                    cfg.num_stages))
            for splits in range(1, launch.MAX_SPLITS + 1):
                cfg = launch.merge_config(splits, d)
                out.append(_variant("attention_decode:decode_merge_kernel", f"{dt} D={d} S<={cfg.BLOCK}",
                                    [("po_ptr", "*fp32"), ("plse_ptr", "*fp32"), ("o_ptr", p), ("cu_q_ptr", "*i32")]
                                    + i32("stride_ot", "stride_oh", "n_q_heads", "num_splits"),
                                    [("BLOCK_S", cfg.BLOCK), ("HEAD_DIM", d)], cfg.num_warps))
    merged = {}  # shapes that select the same launch config compile once; their labels are joined
    for v in out:
        key = (v.kernel, v.signature, v.constexprs, v.num_warps, v.num_stages, v.aligned)
        if key in merged and v.label != merged[key].label:
            extra = v.label.split()[1].split("=")[-1]  # "bf16 H=3584 res=0" -> "3584"
            label = merged[key].label.split()
            label[1] = f"{label[1]},{extra}"
            v = Variant(**{**merged[key].__dict__, "label": " ".join(label)})
        merged[key] = v
    return list(merged.values())


def _tile(cfg) -> str:
    """64x64w4s2: BLOCK_M x BLOCK_N, warps, stages."""
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}w{cfg.num_warps}s{cfg.num_stages}"


def compile_one(variant: Variant, cap: int) -> dict:
    """Compile one variant for one arch; returns the table row (error text in row["error"])."""
    import contextlib
    import importlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = dict(kernel=variant.kernel.split(":")[1], label=variant.label, arch=f"sm_{cap}", regs=-1, stack=-1,
               shared=-1, spill_st=-1, spill_ld=-1, error="")
    try:
        module, name = variant.kernel.split(":")
        fn = getattr(importlib.import_module(f"qwen2_triton.kernels.{module}"), name)
        names = [n for n, _ in variant.signature]
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in variant.aligned}
        src = triton.compiler.ASTSource(fn=fn, signature=dict(variant.signature),
                                        constexprs=dict(variant.constexprs), attrs=attrs)
        log = io.StringIO()  # Triton prints its own ptxas -v log (TRITON_DUMP_PTXAS_LOG, set by run())
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                      options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
        row["shared"] = int(compiled.metadata.shared)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if not spills:
            raise RuntimeError("no ptxas -v log captured (was the kernel served from Triton's cache?)")
        row["spill_st"] = sum(int(st) for st, _ in spills)
        row["spill_ld"] = sum(int(ld) for _, ld in spills)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, f"{name}.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            res = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", cubin], capture_output=True,
                                 text=True, check=True).stdout
            row["regs"] = int(re.search(r"REG:(\d+)", res).group(1))
            row["stack"] = int(re.search(r"STACK:(\d+)", res).group(1))  # spilled registers live in the stack frame
    except Exception as exc:  # reported in the table and turned into a non-zero exit status
        text = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {text[-1] if text else ''}"[:160]
    return row


def _problems(row) -> str:
    if row["error"]:
        return row["error"]
    cap = int(row["arch"][3:])
    if row["spill_st"] or row["spill_ld"] or row["stack"]:
        return "SPILL"
    from qwen2_triton.kernels.launch import max_shared_bytes

    if row["shared"] > max_shared_bytes(cap):
        return f"SHARED>{max_shared_bytes(cap)}"
    return ""


def run(archs, dtypes, kernels=None, jobs=None) -> int:
    todo = [(v, cap) for cap in archs for v in variants(dtypes, cap)
            if not kernels or any(k in v.kernel for k in kernels)]
    jobs = jobs or min(8, os.cpu_count() or 1)
    # A private, fresh cache makes Triton run ptxas (and print its -v log) for every variant; workers inherit it.
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    try:
        with tempfile.TemporaryDirectory() as cache_dir:
            os.environ.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1")
            with futures.ProcessPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(compile_one, *zip(*todo))) if todo else []
    finally:  # main() may run inside the CLI's process: leave its environment as it was
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"{'kernel':20} {'variant':24} {'arch':5} {'regs':>4} {'stack':>5} {'shared':>6} {'spill st/ld':>11}  status")
    failed = 0
    for r in rows:
        problem = _problems(r)
        failed += bool(problem)
        print(f"{r['kernel']:20} {r['label']:24} {r['arch']:5} {r['regs']:>4} {r['stack']:>5} {r['shared']:>6} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5}  {problem or 'ok'}")
    print(f"{len(rows)} compiled, {failed} failed")
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2-triton kernels check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--kernels", default="", help="substrings of kernel names to keep (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: min(8, CPUs))")
    args = parser.parse_args(argv)
    archs = [int(a.strip().removeprefix("sm_")) for a in args.arch.split(",") if a.strip()]
    dtypes = [d for d in args.dtypes.split(",") if d]
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes must be a subset of {','.join(DTYPES)}, got {args.dtypes}")
    if interpreter_active():  # kernels would be interpreter wrappers here: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = list(argv if argv is not None else sys.argv[1:])
        return subprocess.call([sys.executable, "-m", "qwen2_triton.kernels.compile_check", *argv], env=env)
    # Pin FP fusion to Triton's current default (on) so the warning that 3.9 prints per compile stays quiet.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    kernels = [k for k in args.kernels.split(",") if k]
    return run(archs, dtypes, kernels, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
