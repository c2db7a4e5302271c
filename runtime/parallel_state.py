"""Tensor-parallel process groups and the collectives the sharded graph calls, on torch.distributed.

Two groups over the same N ranks (rank 0 is the driver: it schedules and samples):
- ``group``: the model's collectives (vocab-parallel embedding, the all-reduces after o_proj and down_proj, the
  logits gather), NCCL on CUDA and gloo on CPU, with a timeout of COLLECTIVE_TIMEOUT_S: every rank enters
  them within one step of the others, so a longer wait means a rank is gone.
- ``ctrl``: gloo on the CPU, the driver's step inputs (small int64 tensors) and start-up messages. A worker
  waits here while the driver is idle, which may be for hours: CONTROL_TIMEOUT_S is a year, and a driver that
  dies closes its sockets, which ends the wait at once.

A rank that hits an error writes it to the rendezvous store (``report_error``) before it exits, so the driver
can name the rank and the cause when its own collective fails (``on_failure``).
"""
from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

COLLECTIVE_TIMEOUT_S = 120  # a collective inside a step: ranks arrive within one step's skew (milliseconds)
CONTROL_TIMEOUT_S = 365 * 24 * 3600  # a worker waiting for the next step: the driver may idle for hours
STORE_PREFIX = "qwen2_triton/tp"


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed (died, raised, or stopped answering); the message names it. The engine is
    unusable afterwards: its workers are stopped."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group and the collectives of a sharded forward."""
    rank: int
    world: int
    device: torch.device
    group: object  # torch.distributed ProcessGroup for the model's collectives
    ctrl: object  # gloo ProcessGroup for step inputs and start-up messages
    store: object | None  # the rendezvous store (error reports); None when joining a group set up elsewhere
    owns_group: bool = True  # False: the caller initialized torch.distributed and destroys it
    # driver: turns a failed collective into the error to raise (names the rank; stops the workers)
    on_failure: Callable[[BaseException], BaseException] | None = field(default=None, repr=False)
    failed: BaseException | None = None

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------ model collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (the partial outputs of a row-parallel linear)."""
        self._run(dist.all_reduce, x, group=self.group)
        return x

    def embedding(self, ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> torch.Tensor:
        """Vocab-parallel lookup: ``weight`` (V/N, H) holds rows [vocab_start, vocab_start + V/N); ids outside
        them give zeros here and their row on the rank that holds it; one all-reduce assembles (T, H). No host
        sync, so a decode step stays capturable."""
        local = ids - vocab_start
        outside = (local < 0) | (local >= weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), weight)  # (T, H)
        h.masked_fill_(outside[:, None], 0)
        return self.all_reduce(h)

    def gather_logits(self, x: torch.Tensor, vocab: int) -> torch.Tensor:
        """(R, V/N) local logits -> (R, V) on the driver (vocab-padding columns cut); other ranks get their
        own columns back (they do not sample)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.is_driver else None
        self._run(dist.gather, x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab] if self.is_driver else x

    # ----------------------------------------------------------------------------------- control messages
    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU tensor from the driver to every rank (in place), on the control group."""
        self._run(dist.broadcast, t, src=0, group=self.ctrl)
        return t

    def broadcast_object(self, obj=None):
        box = [obj]
        self._run(dist.broadcast_object_list, box, src=0, group=self.ctrl)
        return box[0]

    def min_over_ranks(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        self._run(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.ctrl)
        return int(t.item())

    def _run(self, fn, *args, **kwargs):
        if self.failed is not None:
            raise TensorParallelError(f"the tensor-parallel group failed earlier: {self.failed}")
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # gloo: "Connection closed by peer", timeouts
            err = self.on_failure(e) if self.on_failure is not None else TensorParallelError(
                f"tensor-parallel rank {self.rank}: a collective failed: {e}")
            self.failed = err
            raise err from e

    # ------------------------------------------------------------------------------------- error reports
    def reported_errors(self) -> dict[int, str]:
        """{rank: error text} of the ranks that reported one."""
        out = {}
        if self.store is None:
            return out
        for r in range(1, self.world):
            key = f"{STORE_PREFIX}/error/{r}"
            try:
                if self.store.check([key]):
                    out[r] = self.store.get(key).decode(errors="replace")
            except Exception:  # noqa: BLE001 - a store that cannot answer has nothing to report
                break
        return out

    def barrier(self) -> None:
        self._run(dist.barrier, group=self.ctrl)

    def destroy(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_groups(rank: int, world: int, device: torch.device, store) -> TensorParallel:
    """Join the default process group (the device's backend) and a gloo control group over the same ranks.
    The ranks first agree on the device type through the store: a rank on a GPU and one on a CPU would pick
    different backends and hang in the rendezvous, so that is an error, named, before any weight loads."""
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; one tensor-parallel "
                           "engine per process: close() the other LLM first")
    kinds = device_types(store, rank, world, device)
    if len(set(kinds)) > 1:
        raise ValueError("tensor-parallel ranks are on different device types: " +
                         ", ".join(f"rank {r}: {k}" for r, k in enumerate(kinds)) +
                         "; every rank must run on CUDA, or every rank on the CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"{STORE_PREFIX}/pg", store), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    return TensorParallel(rank, world, device, dist.group.WORLD, ctrl, store)


def report_error(store, rank: int, exc: BaseException) -> None:
    """Leave this rank's error in the store for the driver to read (best effort: the store may be gone with the
    driver)."""
    if store is None:
        return
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    try:
        store.set(f"{STORE_PREFIX}/error/{rank}", text)
    except Exception:  # noqa: BLE001 - the driver is gone too; nothing left to tell
        pass


def announce_closed(store, rank: int) -> None:
    """A worker has left the group (the driver leaves last: see runtime/tp_driver.py close)."""
    if store is not None:
        try:
            store.set(f"{STORE_PREFIX}/closed/{rank}", "1")
        except Exception:  # noqa: BLE001 - a driver that is gone waits for nothing
            pass


def wait_closed(store, world: int, timeout_s: float) -> None:
    """Until every worker has left the group (or ``timeout_s``): a rank that tears its group down while a peer
    is still tearing down its own can abort in gloo ("terminate called without an active exception", seen in
    ~1 of 8 torchrun runs here), so the driver goes last, as it does after joining the processes it spawned."""
    if store is None or world < 2:
        return
    try:
        store.wait([f"{STORE_PREFIX}/closed/{r}" for r in range(1, world)], datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - a worker that never answers is the launcher's to reap
        pass


def device_types(store, rank: int, world: int, device: torch.device) -> list[str]:
    store.set(f"{STORE_PREFIX}/device/{rank}", device.type)
    return [store.get(f"{STORE_PREFIX}/device/{r}").decode() for r in range(world)]
