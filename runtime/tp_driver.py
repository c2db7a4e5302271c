"""The driver's side of tensor parallelism: start the other ranks, send them each step, stop them.

Two ways in, one protocol (runtime/worker.py):
- one machine: ``LLM(..., tensor_parallel_size=N)`` spawns N-1 workers (torch.multiprocessing, spawn) that
  rendezvous on a TCPStore this process hosts on 127.0.0.1; rank r runs on cuda:r (or the CPU).
- torchrun (one or many machines): every process runs the same script; env:// (RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT) forms the group; rank 0 returns from ``LLM(...)`` as the driver, every other rank
  serves steps inside ``LLM(...)`` and leaves the process (SystemExit(0)) when rank 0 closes its LLM.

Lifecycle: ``close()`` sends the shutdown command and joins the workers (terminating a straggler after
JOIN_TIMEOUT_S); a worker also ends when the driver dies or drops its LLM (its pipe from the driver reads EOF)
and on any error of its own, which it reports through the store. A collective that fails in the driver (a
dead peer closes its sockets, so gloo fails at once; a hung one hits COLLECTIVE_TIMEOUT_S) becomes a
TensorParallelError naming the rank, and the remaining workers are stopped: no hang, no orphan.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
import weakref

import torch
import torch.distributed as dist

from qwen2_triton.runtime.parallel_state import CONTROL_TIMEOUT_S, STORE_PREFIX, TensorParallel, TensorParallelError, \
    init_groups, wait_closed
from qwen2_triton.runtime.worker import Setup, WorkerSpec, encode_step, run_worker, shutdown_header

START_TIMEOUT_S = 300  # a spawned worker imports torch and connects to the store (seconds on a loaded machine)
JOIN_TIMEOUT_S = 10  # a worker told to stop leaves within this, or is terminated
REAP_S = 2.0  # after a failure: how long dead workers get to be reaped before the error names them


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def tp_device(device: torch.device, world: int) -> torch.device:
    """Rank 0's device; the checks that need no process: enough GPUs, no pinned index."""
    if device.type != "cuda":
        return device
    if launched_by_torchrun():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible on this machine")
        return torch.device("cuda", local)
    if device.index not in (None, 0):
        raise ValueError(f"device={str(device)!r} with tensor_parallel_size={world}: rank r runs on cuda:r; pass "
                         "device='cuda' and pick the GPUs with CUDA_VISIBLE_DEVICES")
    if world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs; {torch.cuda.device_count()} visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", 0)


class TPDriver:
    """Rank 0's handle on the group: the collectives (``tp``), the workers it spawned, shutdown."""

    def __init__(self, tp: TensorParallel, procs=(), pipes=(), store=None):
        self.tp, self.procs, self.pipes, self._store = tp, list(procs), list(pipes), store
        self.closed = False
        tp.on_failure = self._failure
        # Dropped without close() (garbage-collected, interpreter exit): the workers still go.
        self._finalizer = weakref.finalize(self, _abandoned, self.procs, self.pipes, tp.ctrl, tp.store, tp.world,
                                           tp.owns_group)

    # start-up, in the order of runtime/worker.py build_rank
    def send_setup(self, plan, max_model_len: int) -> Setup:
        return self.tp.broadcast_object(Setup(plan, max_model_len))

    def agree_num_blocks(self, n: int) -> int:
        return self.tp.min_over_ranks(n)

    def ready(self) -> None:
        self.tp.barrier()

    def send_step(self, chunks, step) -> None:
        """ModelRunner's hook: every rank runs the step the driver is about to run."""
        header, body = encode_step(chunks, step)
        self.tp.broadcast(header)
        self.tp.broadcast(body)

    def describe(self, model) -> str:
        from qwen2_triton.model.sharding import layout

        where = "spawned on this machine" if self.procs else "torchrun"
        return (f"tensor parallel: {self.tp.world} ranks ({where}), backend {dist.get_backend()}, rank 0 on "
                f"{self.tp.device}; {layout(model.cfg, self.tp.world, model.dtype.itemsize)}")

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.tp.failed is None and self._finalizer.alive:  # (at interpreter exit the finalizer ran first)
            with contextlib.suppress(Exception):  # a worker that is already gone is stopped below anyway
                self.tp.broadcast(shutdown_header())
        _stop_processes(self.procs, self.pipes)
        if not self.procs and self.tp.failed is None:  # torchrun: no process to join; wait for their word
            wait_closed(self.tp.store, self.tp.world, JOIN_TIMEOUT_S)
        self._finalizer.detach()
        with contextlib.suppress(Exception):
            self.tp.destroy()
        self._store = None

    def _failure(self, exc: BaseException) -> BaseException:
        """The error to raise for a collective that failed in the driver: which rank, and why."""
        deadline = time.monotonic() + REAP_S
        for p in self.procs:  # a killed or crashed worker is reaped within moments
            p.join(max(0.0, deadline - time.monotonic()))
        reports = self.tp.reported_errors()
        causes = []
        for r, p in enumerate(self.procs, start=1):
            if p.exitcode is not None and p.exitcode < 0:
                causes.append(f"rank {r} (pid {p.pid}) was killed by {signal.Signals(-p.exitcode).name}")
            elif r in reports:
                causes.append(f"rank {r} (pid {p.pid}) failed: {reports[r]}")
            elif p.exitcode is not None:
                causes.append(f"rank {r} (pid {p.pid}) exited with status {p.exitcode}")
        if not self.procs:  # torchrun: the store holds what the other ranks reported
            causes = [f"rank {r} failed: {text}" for r, text in sorted(reports.items())]
        if not causes:
            causes = [f"a rank stopped answering ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]
        self.closed = True
        _stop_processes(self.procs, self.pipes, grace=REAP_S)  # the group is broken: no worker can go on
        self._finalizer.detach()
        with contextlib.suppress(Exception):
            self.tp.destroy()
        return TensorParallelError("tensor-parallel engine stopped: " + "; ".join(causes) +
                                   ". Its other workers were stopped; create a new LLM to continue.")


def _abandoned(procs, pipes, ctrl, store, world: int, owns_group: bool) -> None:
    """The driver was dropped without close() (garbage-collected, or the interpreter is exiting): tell the
    workers to stop (torchrun's have no pipe from this process), stop the ones it spawned, and leave the group
    before interpreter teardown clears the group's tensors out of order (which aborts the process in torch's
    THPVariable_clear)."""
    with contextlib.suppress(Exception):  # a group that is already broken has no one left to tell
        dist.broadcast(shutdown_header(), src=0, group=ctrl)
    _stop_processes(procs, pipes, REAP_S)
    if not procs:
        wait_closed(store, world, JOIN_TIMEOUT_S)
    if owns_group and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _stop_processes(procs, pipes, grace: float = JOIN_TIMEOUT_S) -> None:
    """Join the workers within ``grace`` seconds, then terminate (and kill) what is left. With a short grace
    (after a failure) the pipes close first: a worker blocked in a collective reads EOF there and leaves."""
    def close_pipes():
        for conn in pipes:
            with contextlib.suppress(OSError):
                conn.close()

    if grace < JOIN_TIMEOUT_S:
        close_pipes()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)
    close_pipes()


def start_engine_group(config, model, device: torch.device, dtype: torch.dtype, kernels: str) -> TPDriver:
    """For EngineCore: check that the model divides into ``config.tensor_parallel_size`` shards and that the
    devices are there (reading config.json or the GGUF metadata, no weight), then form the group."""
    from dataclasses import replace

    from qwen2_triton.model.loader import read_config
    from qwen2_triton.model.sharding import check_divisible

    world = config.tensor_parallel_size
    check_divisible(read_config(model), world, source=getattr(model, "name", str(model)))
    device = tp_device(device, world)
    spec = WorkerSpec(replace(config, model=model, progress=False), dtype, kernels, device.type)
    return start(world, spec, device)


def start(world: int, spec: WorkerSpec, device: torch.device) -> TPDriver:
    """Form the group; on rank 0 return its driver. Under torchrun, any other rank serves steps here and then
    leaves the process."""
    if launched_by_torchrun():
        return _join_torchrun(world, spec, device)
    return _spawn(world, spec, device)


def _spawn(world: int, spec: WorkerSpec, device: torch.device) -> TPDriver:
    import torch.multiprocessing as mp

    from qwen2_triton.runtime.worker import spawned_main

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; one tensor-parallel "
                           "engine per process: close() the other LLM first")
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=START_TIMEOUT_S))
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        with _worker_threads(world, device):
            for r in range(1, world):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=spawned_main, args=(r, world, "127.0.0.1", store.port, spec, recv),
                                name=f"qwen2-triton-tp{r}", daemon=True)
                p.start()
                recv.close()  # only the worker holds the read end; this process holds the write end
                procs.append(p)
                pipes.append(send)
        _wait_started(store, procs)
        tp = init_groups(0, world, device, store)
    except BaseException:
        _stop_processes(procs, pipes)
        raise
    return TPDriver(tp, procs, pipes, store)


def _wait_started(store, procs) -> None:
    """Until every worker has joined the store; a worker that exits first (an import error, a broken
    environment) is named at once instead of after the rendezvous timeout."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = dict(enumerate(procs, start=1))
    while waiting:
        for r, p in list(waiting.items()):
            if store.check([f"{STORE_PREFIX}/started/{r}"]):
                del waiting[r]
            elif p.exitcode is not None:
                raise TensorParallelError(
                    f"tensor-parallel rank {r} (pid {p.pid}) exited with status {p.exitcode} before joining the "
                    "group; its output above says why (a script that creates the LLM at top level needs the "
                    "`if __name__ == '__main__':` guard: spawned workers import the script)")
        if waiting and time.monotonic() > deadline:
            raise TensorParallelError(f"tensor-parallel ranks {sorted(waiting)} did not start within "
                                      f"{START_TIMEOUT_S} s")
        if waiting:
            time.sleep(0.05)


@contextlib.contextmanager
def _worker_threads(world: int, device: torch.device):
    """On the CPU each rank gets its share of the cores for its BLAS and OpenMP pools (as torchrun sets
    OMP_NUM_THREADS): N processes each spinning a pool of every core slow each other down. A value the user
    set is kept. The spawned processes read the environment at start."""
    if device.type != "cpu":
        yield
        return
    share = str(max(1, (os.cpu_count() or 1) // world))
    keys = [k for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k not in os.environ]
    os.environ.update({k: share for k in keys})
    try:
        yield
    finally:
        for k in keys:
            os.environ.pop(k, None)


def _join_torchrun(world: int, spec: WorkerSpec, device: torch.device) -> TPDriver:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise ValueError(f"tensor_parallel_size={world}, but torchrun started {size} processes (WORLD_SIZE); "
                         f"make --nproc-per-node x --nnodes = {world}")
    tp, store = None, None
    if dist.is_initialized():  # the script formed the group itself: use it, and leave it to the script
        if dist.get_world_size() != world:
            raise ValueError(f"tensor_parallel_size={world}, but the process group has {dist.get_world_size()} ranks")
        ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
        tp = TensorParallel(rank, world, device, dist.group.WORLD, ctrl, store=None, owns_group=False)
    else:
        store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=START_TIMEOUT_S)))
    if rank != 0:
        run_worker(rank, world, device, store, spec, tp=tp)
        raise SystemExit(0)  # rank 0 closed its LLM: this process has served its purpose
    return TPDriver(tp or init_groups(0, world, device, store))
