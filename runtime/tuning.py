"""Small autotuning of the attention tile configs, cached on disk so that a restart does not re-tune.

What is tuned: the tiles, warps and stages of prefill and split-KV decode attention, the two launches whose
best setting depends on the GPU (shared memory, SM count, wgmma on sm_90) as much as on the shape. The row
kernels (RMSNorm, SwiGLU, rotary, store_kv) stream memory with one sensible setting each (kernels/launch.py).
The quantized linears' launch shapes go through the same ``tune`` and cache (runtime/quant_tuning.py).
Candidates: kernels/launch.py ``prefill_candidates`` / ``decode_candidates`` for the device's compute
capability, each compiled and checked for registers, spills and shared memory on sm_80/86/90 by
kernels/compile_check.py, and each tested against the reference in tests/test_kernel_attention_configs.py.
When: once at start-up (runtime/kernel_plan.py), after the weights load and before the KV pool is sized and the
decode graphs are captured: a captured graph keeps the configs it was captured with.
Key: ``<GPU name>|sm_<cap>|triton <version>|<kernel>|<shape bucket>``; the bucket names the dtype, the head
layout, the timed cases (``SHAPES``) and a hash of the kernel's source, so an edited kernel is tuned again.
Cache: one JSON object in ``$QWEN2_TRITON_CACHE/tuning.json`` (default ~/.cache/qwen2_triton), replaced
atomically on each write. An unreadable file is reported and starts over; a cached choice that is no longer a
candidate (the lists in kernels/launch.py changed) is tuned again.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen2_triton.kernels.launch import AttnConfig

# The cases timed per kernel; a config's score is the geometric mean of its times over them, so no one case
# decides alone. Prefill: a 2048-token prompt. Decode: the ends that matter, batch 1 at 1k and 32k keys (few
# programs: the split count and the pipeline depth decide) and batch 64 at 1k (many programs, one split each);
# batch 64 x 32k would need 4 GB of K/V for Qwen2-7B at start-up.
SHAPES = {"prefill": [dict(q_len=2048, seq_len=2048, batch=1)],
          "decode": [dict(q_len=1, seq_len=1024, batch=1), dict(q_len=1, seq_len=32768, batch=1),
                     dict(q_len=1, seq_len=1024, batch=64)]}
# A candidate replaces the heuristic default only when at least this much faster: timing noise must not flip it.
MIN_GAIN = 0.03


def default_cache_path() -> Path | None:
    """tuning.json in the project's cache folder (model/demo.py ``cache_dir``: $QWEN2_TRITON_CACHE, else
    ~/.cache/qwen2_triton), beside the assembled demo model; None without a home directory."""
    from qwen2_triton.model.demo import cache_dir

    try:
        return cache_dir() / "tuning.json"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return None


def tuning_key(gpu_name: str, capability: int, triton_version: str, kernel: str, bucket: str) -> str:
    return f"{gpu_name}|sm_{capability}|triton {triton_version}|{kernel}|{bucket}"


def config_label(cfg) -> str:
    """An AttnConfig as 64x64w4s2 (BLOCK_M x BLOCK_N, warps, stages); a quantized linear's QuantConfig as
    16x64x128/4w4s3 (BLOCK_M x BLOCK_N x BLOCK_K / SPLIT_K, warps, stages)."""
    if hasattr(cfg, "BLOCK_K"):
        return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}/{cfg.SPLIT_K}w{cfg.num_warps}s{cfg.num_stages}"
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}w{cfg.num_warps}s{cfg.num_stages}"


class TuningCache:
    """The on-disk record of tuned choices: {key: {"config": {...}, "ms": ..., "timings": {...}, "date": ...}}.
    Nothing about the file may stop serving: unreadable, unwritable or no home at all, the choices then live
    in memory for this process and the problem is printed once."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.entries: dict[str, dict] = {}
        self.problem = ""  # why an existing file was not used, for the start-up report
        if self.path is None:
            self.problem = "no home directory for the tuning cache; set QWEN2_TRITON_CACHE to keep tunings"
            print(f"qwen2-triton: {self.problem}", file=sys.stderr)
            return
        try:
            if self.path.exists():
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if not isinstance(data, dict):
                    raise ValueError(f"top level is a {type(data).__name__}, not an object")
                self.entries = data
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError; PermissionError an OSError
            self.problem = f"tuning cache {self.path} unreadable ({exc}); tuning again"
            print(f"qwen2-triton: {self.problem}", file=sys.stderr)

    def get(self, key: str, cls: type = AttnConfig):
        """The cached ``cls`` (AttnConfig, or kernels/quant_linear.py QuantConfig) for ``key``, or None."""
        entry = self.entries.get(key)
        try:
            cfg = cls(**entry["config"]) if entry else None
        except (TypeError, KeyError):  # an entry from another version of the config class
            return None
        hints = typing.get_type_hints(cls)
        if cfg is not None and not all(type(getattr(cfg, f.name)) is hints[f.name] for f in dataclasses.fields(cls)):
            return None  # 64.0 would equal 64 but reach a constexpr as a float: a foreign or hand-edited entry
        return cfg

    def put(self, key: str, cfg, timings: dict[str, float]) -> None:
        self.entries[key] = {"config": dataclasses.asdict(cfg), "ms": timings[config_label(cfg)],
                             "timings": timings, "date": datetime.date.today().isoformat()}
        if self.path is None:
            return
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file, never half
        except OSError as exc:  # a read-only home must not stop serving: the choice still holds in memory
            print(f"qwen2-triton: could not write the tuning cache {self.path}: {exc}", file=sys.stderr)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


@dataclass
class TuneResult:
    config: AttnConfig  # or a quantized linear's QuantConfig (runtime/quant_tuning.py)
    source: str  # "tuned" | "cache" | "default"
    detail: str  # timings, the cache file, or why the default stands


def _launch_errors() -> tuple[type[BaseException], ...]:
    """What a candidate that does not fit this GPU or this Triton raises: out of shared memory or registers at
    launch, a front-end compile error, a ptxas failure (the errors Triton's own autotuner skips). Anything else
    (a CUDA fault) is a bug and propagates."""
    from triton.compiler import errors as compiler_errors
    from triton.runtime import errors as runtime_errors

    names = [(runtime_errors, "OutOfResources"), (runtime_errors, "PTXASError"),
             (compiler_errors, "CompilationError"), (compiler_errors, "CompileTimeAssertionFailure")]
    return tuple(getattr(m, n) for m, n in names if hasattr(m, n))  # PTXASError is newer than some Tritons


def tune(key: str, candidates: list, time_ms: Callable[[AttnConfig], float], cache: TuningCache,
         what: str = "attention tile") -> TuneResult:
    """The fastest of ``candidates`` (AttnConfigs or QuantConfigs, one class) by ``time_ms`` (milliseconds per
    call), or the cached choice for ``key`` if it is still a candidate. candidates[0] is the heuristic default:
    kept unless another is MIN_GAIN faster. Candidates that cannot compile or launch here are skipped; if none
    can, RuntimeError says so (naming ``what`` was tuned)."""
    cached = cache.get(key, type(candidates[0]))
    if cached is not None and cached in candidates:
        return TuneResult(candidates[candidates.index(cached)], "cache", f"cached in {cache.path}")
    timings, failed = {}, []
    for cfg in candidates:
        try:
            timings[config_label(cfg)] = float(time_ms(cfg))
        except _launch_errors() as exc:
            failed.append(f"{config_label(cfg)}: {type(exc).__name__}")
    if not timings:  # the default among them: launching it later would only fail further from the cause
        raise RuntimeError(f"none of the {len(candidates)} {what} candidates ({key.split('|')[3]}) can "
                           f"run on this GPU with this Triton: {'; '.join(failed)}. Please report it with the "
                           "output of 'qwen2-triton env'.")
    best = min((c for c in candidates if config_label(c) in timings), key=lambda c: timings[config_label(c)])
    default_ms = timings.get(config_label(candidates[0]))
    if default_ms is not None and timings[config_label(best)] > (1 - MIN_GAIN) * default_ms:
        best = candidates[0]
    cache.put(key, best, timings)
    vs = f" vs {default_ms:.4f} ms for the default" if default_ms is not None and best != candidates[0] else ""
    skipped = f"; skipped {', '.join(failed)}" if failed else ""
    return TuneResult(best, "tuned", f"{timings[config_label(best)]:.4f} ms{vs}, best of {len(timings)}{skipped}")


def attention_timers(device, dtype, n_q_heads: int, n_kv_heads: int, head_dim: int, block_size: int,
                     sm_count: int | None, bench: Callable | None = None) -> dict[str, Callable[[AttnConfig], float]]:
    """Per kernel, a function timing a config on random data of every case in ``SHAPES`` (the geometric mean of
    the cases' ms per launch). ``bench(fn) -> ms`` defaults to triton.testing.do_bench (CUDA); tests pass their
    own to run the launches through the interpreter."""
    import math

    import torch

    from qwen2_triton.kernels.attention_decode import attention_decode
    from qwen2_triton.kernels.attention_prefill import attention_prefill
    from qwen2_triton.kernels.launch import num_kv_splits
    from qwen2_triton.kernels.testing import make_paged_batch

    if bench is None:
        from triton.testing import do_bench as bench
    scale = head_dim ** -0.5
    g = torch.Generator(device=device).manual_seed(0)

    def batch(s):
        return make_paged_batch([s["q_len"]] * s["batch"], [s["seq_len"]] * s["batch"], n_q_heads, n_kv_heads,
                                head_dim, dtype, block_size=block_size, device=device, generator=g)

    pre = [batch(s) for s in SHAPES["prefill"]]
    dec = [(batch(s), num_kv_splits(s["batch"], n_kv_heads, s["seq_len"], sm_count)) for s in SHAPES["decode"]]

    def geomean(times):
        return math.exp(sum(math.log(max(t, 1e-9)) for t in times) / len(times))

    def prefill_ms(cfg):
        return geomean([bench(lambda b=b, out=torch.empty_like(b[0]): attention_prefill(*b, scale, out, cfg))
                        for b in pre])

    def decode_ms(cfg):
        return geomean([bench(lambda b=b, n=n, out=torch.empty_like(b[0]): attention_decode(*b, scale, out, n, cfg))
                        for b, n in dec])

    return {"prefill": prefill_ms, "decode": decode_ms}


def shape_bucket(kernel: str, dtype, n_q_heads: int, n_kv_heads: int, head_dim: int, block_size: int) -> str:
    cases = ",".join(f"B{s['batch']}q{s['q_len']}k{s['seq_len']}" for s in SHAPES[kernel])
    return (f"{str(dtype).replace('torch.', '')} Hq={n_q_heads} Hk={n_kv_heads} D={head_dim} page={block_size} "
            f"{cases} src={kernel_source_hash(kernel)}")


def kernel_source_hash(kernel: str) -> str:
    """8 hex digits of the kernel's source files: an edited kernel is tuned again, not served an old choice."""
    return source_hash("attention_tile", f"attention_{kernel}")


def source_hash(*modules: str) -> str:
    """8 hex digits of the sources of kernels/<module>.py for each of ``modules``."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for mod in modules:
        path = importlib.import_module(f"qwen2_triton.kernels.{mod}").__file__
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:8]
