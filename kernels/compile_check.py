"""Ahead-of-time compile check, no GPU needed: every kernel variant x every launch config kernels/launch.py can
select for Qwen2 shapes, compiled for each requested arch, with the facts a performance review reads first.

    python -m qwen2_triton.kernels.compile_check --arch sm_80,sm_90 [--dtypes bf16,...] [--kernels rms,...] [--dump DIR]

Variants are captured from the real launchers (``variants``; the quantized linears' in compile_check_quant.py and
compile_check_gguf.py): each launcher runs on small CPU tensors of a Qwen2 shape with its kernel replaced by a
recorder, and the recorded arguments are specialised by Triton's own rule (``native_specialize_impl``, as the JIT
does at launch: ints divisible by 16 and 16-byte aligned pointers get ``tt.divisibility``, ints equal to 1 become
constants), so what is compiled here is what the runtime compiles, and no hand-written list can drift.
Each variant goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``; registers and
stack frame from the cuobjdump shipped in triton/backends/nvidia/bin (``-res-usage``), spill stores/loads from
the ``ptxas -v`` log of Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG, a fresh cache so ptxas runs every time;
the same mechanism in triton 3.6 and 3.9), dynamic shared memory from Triton's metadata, and from the TTGIR and
PTX (kernels/compiled_facts.py): programs per SM, MMA kind, widest global load, and per dot the useful rows
per warpgroup (wgmma) or warp (mma.sync).
Exit status 1 on any compile error, any spill, shared memory above the arch's per-block limit, or a dot whose
warps compute the same rows (a duplicated QK^T: "DUP-ROWS"). Under TRITON_INTERPRET=1 the kernels are
interpreter wrappers, so ``main`` re-runs itself in a subprocess without it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import importlib
import inspect
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
# Attention variants per head_dim: every candidate at a GQA layout (0.5B, 7B); the default also at MHA
# (Qwen1.5-4B: group 1 is a Triton constant, another specialisation).
ATTN_GQA = {64: (14, 2), 128: (28, 4)}
ATTN_MHA = {128: (20, 20)}
PAGE = 16  # the runtime's KV block size


@dataclass(frozen=True)
class Variant:
    kernel: str  # "module:function"
    label: str
    signature: tuple  # ((arg, type), ...) in parameter order: pointers "*bf16", scalars "i32"/"fp32", "constexpr"
    constexprs: tuple  # ((arg, value), ...)
    num_warps: int
    num_stages: int = 3
    aligned: tuple = field(default=())  # args Triton specialises as divisible by 16 (pointers, ints)
    options: tuple = field(default=())  # other compile options the launcher passes ((name, value), ...)

    @property
    def key(self):
        return self.kernel, self.signature, self.constexprs, self.num_warps, self.num_stages, self.aligned, \
            self.options


# ------------------------------------------------------------------------------------------ capture
def _python_fn(kernel):
    return getattr(kernel, "fn", kernel)  # JITFunction and the interpreter's wrapper both keep it in .fn


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(kernel_ref: str):
    """Replace kernels/<module>.<name> by a recorder while the block runs (launchers look their kernel up in
    their module's globals at call time)."""
    module_name, name = kernel_ref.split(":")
    module = importlib.import_module(f"qwen2_triton.kernels.{module_name}")
    real = getattr(module, name)
    rec = _Recorder()
    setattr(module, name, rec)
    try:
        yield rec
    finally:
        setattr(module, name, real)


def specialise(kernel_ref: str, args: tuple, kwargs: dict, label: str) -> Variant:
    """The Variant the JIT would compile for a launch with these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend, CUDAOptions

    module_name, name = kernel_ref.split(":")
    fn = _python_fn(getattr(importlib.import_module(f"qwen2_triton.kernels.{module_name}"), name))
    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    sig, consts, aligned = [], [], []
    for p in params:
        v = values[p.name]
        ty, spec = ("constexpr", None) if "constexpr" in str(p.annotation) else \
            native_specialize_impl(CUDABackend, v, False, True, True)
        sig.append((p.name, ty))
        if ty == "constexpr":  # declared constexpr, or an int equal to 1 (Triton folds it)
            consts.append((p.name, v))
        elif spec == "D":
            aligned.append(p.name)
    stages = kwargs.get("num_stages", CUDAOptions.__dataclass_fields__["num_stages"].default)
    warps = kwargs.get("num_warps", CUDAOptions.__dataclass_fields__["num_warps"].default)
    options = tuple((k, kwargs[k]) for k in ("enable_fp_fusion",) if k in kwargs)  # gguf_linear: off
    return Variant(kernel_ref, label, tuple(sig), tuple(consts), warps, stages, tuple(aligned), options)


def _capture(out: list, kernel_refs, label: str, launch, keep=None) -> None:
    """Run ``launch`` with every kernel of ``kernel_refs`` recorded; add the variants of those in ``keep``
    (default: all of them)."""
    with contextlib.ExitStack() as stack:
        recs = {ref: stack.enter_context(_recording(ref)) for ref in kernel_refs}
        launch()
    for ref, rec in recs.items():
        if keep is None or ref in keep:
            out.extend(specialise(ref, a, k, label) for a, k in rec.calls)


def _tile(cfg) -> str:
    """64x64w4s2: BLOCK_M x BLOCK_N, warps, stages."""
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}w{cfg.num_warps}s{cfg.num_stages}"


def parse_tile(text: str):
    """The AttnConfig written as ``_tile`` writes it (64x64w4s2)."""
    from qwen2_triton.kernels.launch import AttnConfig

    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text.strip())
    if not m:
        raise ValueError(f"a tile is BLOCK_MxBLOCK_NwWARPSsSTAGES, e.g. 64x64w8s2; got {text!r}")
    return AttnConfig(*map(int, m.groups()))


def _paged_meta(q_lens, seq_lens, table_width):
    import torch

    from qwen2_triton.kernels.attention import AttentionMetadata

    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    return AttentionMetadata(cu, torch.tensor(seq_lens, dtype=torch.int32),
                             torch.zeros((len(q_lens), table_width), dtype=torch.int32),
                             torch.zeros(int(cu[-1]), dtype=torch.int64), max(q_lens), max(seq_lens))


def variants(dtypes, cap: int | None = None, extra_prefill=()):
    """Every (kernel, specialisation, warps, stages) the runtime can launch on compute capability ``cap``: the
    heuristic configs plus the attention candidates runtime/tuning.py may pick there (None: every arch's).
    ``extra_prefill``: AttnConfigs to check as well (a tile being considered as a candidate)."""
    import torch

    from qwen2_triton.kernels import launch
    from qwen2_triton.kernels.attention import store_kv
    from qwen2_triton.kernels.attention_decode import attention_decode
    from qwen2_triton.kernels.attention_prefill import attention_prefill
    from qwen2_triton.kernels.rmsnorm import rms_norm
    from qwen2_triton.kernels.rotary import rotary
    from qwen2_triton.kernels.rotary_store_kv import rotary_store_kv
    from qwen2_triton.kernels.swiglu import swiglu

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    caps = [cap] if cap is not None else sorted(launch.MAX_SHARED_BYTES)
    out: list[Variant] = []
    split, merge = "attention_decode:decode_split_kernel", "attention_decode:decode_merge_kernel"
    T = 4  # tokens: values of T never reach a specialisation (it is a grid size)
    for dt in dtypes:
        t = tdt[dt]
        for hidden in HIDDEN:
            x, w = torch.empty(T, hidden, dtype=t), torch.empty(hidden, dtype=t)
            for res in (False, True):
                _capture(out, ["rmsnorm:rms_norm_kernel"], f"{dt} H={hidden} res={int(res)}",
                         lambda: rms_norm(x, w, 1e-6, torch.empty_like(x) if res else None))
        for inter in INTERMEDIATE:
            gu = torch.empty(T, 2 * inter, dtype=t)
            _capture(out, ["swiglu:swiglu_kernel"], f"{dt} I={inter}", lambda: swiglu(gu))
        for hq, hk, d in ATTN_HEADS:
            qkv = torch.empty(T, (hq + 2 * hk) * d, dtype=t)  # q, k, v are views of the fused projection
            q, k, v = (qkv[:, a * d: b * d].view(T, b - a, d) for a, b in ((0, hq), (hq, hq + hk),
                                                                             (hq + hk, hq + 2 * hk)))
            cos_sin = torch.empty(8, d, dtype=torch.float32)
            for pos in (torch.int32, torch.int64):
                _capture(out, ["rotary:rotary_kernel"], f"{dt} {hq}/{hk}x{d} pos={str(pos)[-5:]}",
                         lambda: rotary(q, k, torch.zeros(T, dtype=pos), cos_sin))
            for cache_dt in dtypes:  # store_kv casts k/v to the cache dtype, so any pair can be selected
                cache = torch.empty(4, PAGE, hk, d, dtype=tdt[cache_dt])
                _capture(out, ["attention:store_kv_kernel"], f"{dt} Hk={hk} D={d} cache={cache_dt}",
                         lambda: store_kv(k, v, cache, torch.empty_like(cache), torch.zeros(T, dtype=torch.int64)))
            # the graph's fused op (the runtime's cache has the model's dtype; rows int64 or int32)
            cache = torch.empty(4, PAGE, hk, d, dtype=t)
            for pos in (torch.int32, torch.int64):
                _capture(out, ["rotary_store_kv:rotary_store_kv_kernel"], f"{dt} {hq}/{hk}x{d} pos={str(pos)[-5:]}",
                         lambda: rotary_store_kv(q, k, v, torch.zeros(T, dtype=pos), cos_sin, cache,
                                                 torch.empty_like(cache), torch.zeros(T, dtype=torch.int64)))
        for d in (64, 128):
            layouts = [(ATTN_GQA[d], "all")] + ([(ATTN_MHA[d], "default")] if d in ATTN_MHA else [])
            for (hq, hk), which in layouts:
                qkv = torch.empty(T, (hq + 2 * hk) * d, dtype=t)
                q = qkv[:, : hq * d].view(T, hq, d)
                cache = torch.empty(8, PAGE, hk, d, dtype=t)
                pre = {c for cp in caps for c in launch.prefill_candidates(d, t, cp)} | set(extra_prefill)
                pre_default = {launch.prefill_config(d, t, cp) for cp in caps}
                for cfg in sorted(pre if which == "all" else pre_default, key=str):
                    # a mixed step: two sequences, an eager block table of a width that is not a multiple of 16
                    meta = _paged_meta([1, 3], [40, 3], 5)
                    _capture(out, ["attention_prefill:prefill_kernel"], f"{dt} D={d} G={hq // hk} {_tile(cfg)}",
                             lambda: attention_prefill(q, cache, cache, meta, 0.1, torch.empty_like(q), cfg))
                dec = {c for cp in caps for c in launch.decode_candidates(d, t, hq // hk, cp)}
                dec_default = launch.decode_config(d, t, hq // hk)
                for cfg in sorted(dec if which == "all" else {dec_default}, key=str):
                    # decode graphs: a table as wide as max_model_len / PAGE; the grid cap at batch 1 (64) and,
                    # for the heuristic default, at a cap not divisible by 16 (3) and at large batch (1: no partials)
                    for splits in ((64, 3, 1) if cfg == dec_default else (64,)):
                        meta = _paged_meta([1, 1], [40, 3], 2048)
                        _capture(out, [split, merge], f"{dt} D={d} G={hq // hk} {_tile(cfg)} S={splits}",
                                 lambda: attention_decode(q[:2], cache, cache, meta, 0.1, torch.empty_like(q[:2]),
                                                          splits, cfg), [split])
            # the merge: one config per (grid cap, head_dim); every cap the runtime can choose
            hq, hk = ATTN_GQA[d]
            q = torch.empty(2, hq, d, dtype=t)
            cache = torch.empty(8, PAGE, hk, d, dtype=t)
            meta = _paged_meta([1, 1], [40, 3], 2048)
            for splits in range(2, launch.MAX_SPLITS + 1):
                aligned = " S%16=0" if splits % 16 == 0 else ""
                label = f"{dt} D={d} S<={launch.merge_config(splits, d).BLOCK}{aligned}"
                _capture(out, [split, merge], label,
                         lambda: attention_decode(q, cache, cache, meta, 0.1, torch.empty_like(q), splits), [merge])
    return _dedupe(out)


def _dedupe(vs: list[Variant]) -> list[Variant]:
    """Shapes that select the same compiled kernel compile once; their labels are joined token by token
    ("bf16 H=896 res=0" + "bf16 H=1536 res=0" -> "bf16 H=896,1536 res=0")."""
    merged: dict = {}
    for v in vs:
        old = merged.get(v.key)
        if old is not None and old.label != v.label:
            a, b = old.label.split(), v.label.split()
            if len(a) == len(b):
                label = " ".join(x if x == y or y.split("=")[-1] in x.split("=")[-1].split(",") else
                                 f"{x},{y.split('=')[-1]}" for x, y in zip(a, b))
            else:
                label = old.label
            v = Variant(**{**old.__dict__, "label": label})
        elif old is not None:
            v = old
        merged[v.key] = v
    return list(merged.values())


# ------------------------------------------------------------------------------------------ compile
def compile_one(variant: Variant, cap: int, dump_dir: str | None = None) -> dict:
    """Compile one variant for one arch; returns the table row (error text in row["error"])."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from qwen2_triton.kernels import compiled_facts as facts

    row = dict(kernel=variant.kernel.split(":")[1], label=variant.label, arch=f"sm_{cap}", regs=-1, stack=-1,
               shared=-1, spill_st=-1, spill_ld=-1, progs=-1, mma="?", ld="?", rows="", dup=False, error="")
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
                                      options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages,
                                                   **dict(variant.options)))
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
        ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
        row["progs"] = facts.programs_per_sm(cap, row["regs"], row["shared"], variant.num_warps)
        row["mma"] = facts.mma_kind(ptx, ttgir)
        width, how = facts.widest_load(ptx)
        row["ld"] = f"{width} {how}" if width else "-"
        dots = facts.dot_rows(ttgir)
        if dots:
            worst = min(dots, key=lambda r: r.rows / r.warp_rows)
            row["rows"], row["dup"] = worst.describe(), worst.duplicated
        if dump_dir:
            stem = os.path.join(dump_dir, re.sub(r"[^A-Za-z0-9=,.-]+", "_", f"{name} {variant.label} sm_{cap}"))
            for ext in ("ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(compiled.asm[ext])
    except Exception as exc:  # reported in the table and turned into a non-zero exit status
        text = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {text[-1] if text else ''}"[:160]
    return row


def problems(row) -> str:
    if row["error"]:
        return row["error"]
    cap = int(row["arch"][3:])
    if row["spill_st"] or row["spill_ld"] or row["stack"]:
        return "SPILL"
    from qwen2_triton.kernels.launch import max_shared_bytes

    if row["shared"] > max_shared_bytes(cap):
        return f"SHARED>{max_shared_bytes(cap)}"
    if row["dup"]:
        return f"DUP-ROWS: warps compute the same rows ({row['rows']})"
    return ""


def run(archs, dtypes, kernels=None, jobs=None, dump_dir=None, extra_prefill=()) -> int:
    from qwen2_triton.kernels.compile_check_gguf import gguf_variants
    from qwen2_triton.kernels.compile_check_quant import quant_variants

    todo = [(v, cap) for cap in archs for v in variants(dtypes, cap, extra_prefill)
                              + quant_variants(dtypes, cap) + gguf_variants(dtypes, cap)
            if not kernels or any(k in v.kernel for k in kernels)]
    jobs = jobs or min(8, os.cpu_count() or 1)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    # A private, fresh cache makes Triton run ptxas (and print its -v log) for every variant; workers inherit it.
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_DUMP_PTXAS_LOG")}
    try:
        with tempfile.TemporaryDirectory() as cache_dir:
            os.environ.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1")
            with futures.ProcessPoolExecutor(max_workers=jobs) as pool:
                rows = list(pool.map(compile_one, *zip(*todo), [dump_dir] * len(todo))) if todo else []
    finally:  # main() may run inside the CLI's process: leave its environment as it was
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"{'kernel':22} {'variant':32} {'arch':5} {'regs':>4} {'stack':>5} {'shared':>6} {'spill st/ld':>11} "
          f"{'prog/SM':>7} {'mma':8} {'widest ld':14} {'rows':7} status")
    failed = 0
    for r in rows:
        problem = problems(r)
        failed += bool(problem)
        print(f"{r['kernel']:22} {r['label']:32} {r['arch']:5} {r['regs']:>4} {r['stack']:>5} {r['shared']:>6} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['progs']:>7} {r['mma']:8} {r['ld']:14} {r['rows'] or '-':7} "
              f"{problem or 'ok'}")
    print(f"{len(rows)} compiled, {failed} failed")
    return 1 if failed or not rows else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwen2-triton kernels check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"subset of {','.join(DTYPES)}")
    parser.add_argument("--kernels", default="", help="substrings of kernel names to keep (default: all)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: min(8, CPUs))")
    parser.add_argument("--dump", default=None, metavar="DIR", help="write each variant's TTGIR and PTX here")
    parser.add_argument("--extra-prefill", default="", metavar="TILES",
                        help="prefill tiles to check besides the candidates, e.g. 64x64w8s2,128x128w8s3")
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
    extra = [parse_tile(t) for t in args.extra_prefill.split(",") if t]
    return run(archs, dtypes, kernels, args.jobs, args.dump, extra)


if __name__ == "__main__":
    sys.exit(main())
