"""bench serve's statistics: what the client saw of each request, the latency and throughput summary vLLM's
benchmark_serving.py reports, and the CPU each phase spent (bench/serve.py runs the load)."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds."""
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def summarize(values) -> tuple[float, float, float]:
    """(mean, p50, p99), percentiles linearly interpolated as numpy (and vLLM's benchmark) computes them; NaN for
    no values."""
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(np.percentile(v, 50)), float(np.percentile(v, 99))


def compute_metrics(results: list[RequestResult], duration: float) -> dict:
    """Throughputs over the run's wall time and latency statistics (ms) of the successful requests."""
    done = [r for r in results if r.ok]
    inp, out = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    m = {"completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
         "total_input_tokens": inp, "total_output_tokens": out, "request_throughput": len(done) / duration,
         "output_throughput": out / duration, "total_token_throughput": (inp + out) / duration}
    series = {"ttft": [r.ttft for r in done],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1],
              "itl": [x for r in done for x in r.itl],
              "e2el": [r.latency for r in done]}
    for name, values in series.items():
        mean, p50, p99 = summarize(values)
        m.update({f"mean_{name}_ms": mean * 1e3, f"p50_{name}_ms": p50 * 1e3, f"p99_{name}_ms": p99 * 1e3})
    return m


class CpuMeter:
    """CPU seconds spent over a phase (Linux /proc; NaN elsewhere) by each watched process (this one, the launched
    server), and the cores every other process kept busy meanwhile. On a shared machine throughput follows the
    share of the CPU a phase got, so each phase records both: CPU seconds per output token compare the two paths'
    work whatever the neighbours did, and the other processes' cores tell a crowded run from a slow one."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = {name: pid for name, pid in pids.items() if pid is not None}
        self.missing = [name for name, pid in pids.items() if pid is None]
        self.start = self._read()

    def _read(self) -> tuple[float, dict[str, float], float] | None:
        try:
            hz = os.sysconf("SC_CLK_TCK")
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
            cpu = {}
            for name, pid in self.pids.items():
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu[name] = (int(fields[11]) + int(fields[12])) / hz  # utime + stime, every thread
        except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS), no sysconf (Windows)
            return None
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user..steal, less idle and iowait
        return busy / hz, cpu, time.monotonic()

    def stop(self) -> dict[str, float]:
        """{"other_cpu_cores": ..., "<name>_cpu_s": ... per watched process}."""
        end = self._read()
        out = {f"{name}_cpu_s": math.nan for name in [*self.pids, *self.missing]}
        if self.start is None or end is None or end[2] <= self.start[2]:
            return {"other_cpu_cores": math.nan, **out}
        ours = {name: end[1][name] - self.start[1][name] for name in self.pids}
        others = (end[0] - self.start[0]) - sum(ours.values())
        out.update({f"{name}_cpu_s": v for name, v in ours.items()})
        return {"other_cpu_cores": max(0.0, others) / (end[2] - self.start[2]), **out}
