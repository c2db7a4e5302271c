"""Tensor-parallel ranks 1..N-1: load this rank's shard, then run every step the driver broadcasts, until told
to stop (or until the driver is gone).

The driver (rank 0) schedules and samples; a worker only repeats the driver's model step on its own shard, so
its collectives meet the driver's. Per step the driver broadcasts one fixed-size int64 header and one int64
body on the gloo control group: the fields of runtime/model_runner.py ``StepInputs`` (token ids, positions,
rope rows, slots, sequence starts and lengths, logit rows) and the block tables. The worker rebuilds the
StepInputs and calls the very ``ModelRunner._execute`` the driver calls, so both take the same path (eager
or the decode graph of the same bucket) on the same inputs.

Start-up, in the same order on every rank (each step a collective the driver meets):
    join the groups -> load the shard -> receive the kernel plan and context length -> size the KV pool
    (the minimum over ranks) -> build the ModelRunner (captures decode graphs on CUDA) -> barrier -> steps
"""
from __future__ import annotations

import os
import sys
import threading
import traceback
from dataclasses import dataclass, fields
from types import SimpleNamespace

import torch

from qwen2_triton.runtime.engine_config import EngineConfig
from qwen2_triton.runtime.model_runner import StepInputs
from qwen2_triton.runtime.parallel_state import TensorParallel, announce_closed, init_groups, report_error

CMD_STEP, CMD_SHUTDOWN = 1, 2
# StepInputs fields by their annotation, so that a field added to StepInputs travels without an edit here: the
# "int" and "list[int]" ones travel; row_of (the driver's sequences) travels as its length, which _execute reads;
# fields of Python objects (sequences) stay behind: only the driver samples.
INT_FIELDS = tuple(f.name for f in fields(StepInputs) if str(f.type) in ("int", "<class 'int'>"))
LIST_FIELDS = tuple(f.name for f in fields(StepInputs) if str(f.type) in ("list[int]", "typing.List[int]"))
HEADER = 4 + len(INT_FIELDS) + len(LIST_FIELDS)  # cmd, sequences, logit rows, body length, ints, list lengths


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shard the way the driver builds its own."""
    config: EngineConfig  # ``model`` is a path (a checkpoint directory or a GGUF file)
    dtype: torch.dtype
    kernels: str  # "triton" | "torch", as the driver chose
    device_type: str  # "cuda" (rank r runs on cuda:r) | "cpu"


@dataclass(frozen=True)
class Setup:
    """Decided by the driver after loading, sent to every worker."""
    plan: object  # runtime/kernel_plan.py KernelPlan
    max_model_len: int


# -------------------------------------------------------------------------------------------- step messages
def encode_step(chunks, s: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, body) of one step: int64 CPU tensors, a few hundred bytes for a decode step."""
    tables = [c.seq.block_table for c in chunks]
    lists = [getattr(s, n) for n in LIST_FIELDS]
    flat = [v for lst in lists for v in lst] + [len(t) for t in tables] + [b for t in tables for b in t]
    body = torch.tensor(flat, dtype=torch.int64)
    header = torch.tensor([CMD_STEP, len(chunks), len(s.row_of), body.numel(),
                           *(getattr(s, n) for n in INT_FIELDS), *(len(lst) for lst in lists)], dtype=torch.int64)
    return header, body


def decode_step(header: list[int], body: list[int]) -> tuple[list, StepInputs]:
    """The worker's (chunks, StepInputs) for ``ModelRunner._execute``: each chunk carries its block table and a
    fresh sequence id (decode graphs then resend whole tables: a worker never hears which sequences ended)."""
    n, rows = header[1], header[2]
    ints = dict(zip(INT_FIELDS, header[4: 4 + len(INT_FIELDS)]))
    lengths = header[4 + len(INT_FIELDS):]
    lists, at = {}, 0
    for name, k in zip(LIST_FIELDS, lengths):
        lists[name], at = body[at: at + k], at + k
    table_lens, at = body[at: at + n], at + n
    chunks = []
    for k in table_lens:
        chunks.append(SimpleNamespace(seq=SimpleNamespace(block_table=body[at: at + k], seq_id=object())))
        at += k
    return chunks, StepInputs(**ints, **lists, row_of=[None] * rows)


def shutdown_header() -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0] = CMD_SHUTDOWN
    return h


# ------------------------------------------------------------------------------------------------- worker
def build_rank(tp: TensorParallel, spec: WorkerSpec):
    """Load this rank's shard and build its ModelRunner, meeting the driver (runtime/engine_core.py, the same
    order) at each start-up collective."""
    from qwen2_triton.model.loader import load_model
    from qwen2_triton.runtime.backend import make_ops
    from qwen2_triton.runtime.engine_core import num_kv_blocks
    from qwen2_triton.runtime.model_runner import ModelRunner

    c = spec.config
    ops = make_ops(spec.kernels, tp.device)
    model = load_model(c.model, spec.dtype, tp.device, ops, progress=False, quantization=c.quantization,
                       tp=tp).model
    setup: Setup = tp.broadcast_object()  # the driver's kernel plan and context length
    if hasattr(ops, "use_plan"):
        ops.use_plan(setup.plan)
    blocks = tp.min_over_ranks(num_kv_blocks(c, model, tp.device, spec.dtype, setup.max_model_len))
    runner = ModelRunner(model, blocks, c.block_size, spec.dtype, max_num_seqs=c.max_num_seqs,
                         max_model_len=setup.max_model_len, enforce_eager=c.enforce_eager)
    tp.barrier()
    return runner


def serve_steps(tp: TensorParallel, runner) -> None:
    """Run the driver's steps until it sends the shutdown command."""
    while True:
        header = tp.broadcast(torch.empty(HEADER, dtype=torch.int64)).tolist()
        if header[0] == CMD_SHUTDOWN:
            return
        body = tp.broadcast(torch.empty(header[3], dtype=torch.int64)).tolist()
        chunks, s = decode_step(header, body)
        with runner.model.ops.step_context():
            runner._execute(chunks, s)


def run_worker(rank: int, world: int, device: torch.device, store, spec: WorkerSpec,
               tp: TensorParallel | None = None) -> None:
    """A worker's whole life: groups (unless ``tp`` is given: a group the script formed), shard, steps. Any
    error is left in the store for the driver, which names this rank when its own collective fails, and
    re-raised."""
    try:
        tp = tp or init_groups(rank, world, device, store)
        runner = build_rank(tp, spec)
        serve_steps(tp, runner)
    except BaseException as e:
        report_error(store, rank, e)
        raise
    finally:
        if tp is not None:
            tp.destroy()
            announce_closed(store, rank)


def spawned_main(rank: int, world: int, host: str, port: int, spec: WorkerSpec, parent) -> None:
    """Entry point of a worker the driver spawned (torch.multiprocessing, spawn). ``parent``: the read end of
    a pipe only the driver can write; it reads EOF when the driver closes it or dies, and this process ends."""
    import datetime

    import torch.distributed as dist

    from qwen2_triton.runtime.parallel_state import STORE_PREFIX

    threading.Thread(target=_exit_when_closed, args=(parent,), name="qwen2-triton-parent-watch", daemon=True).start()
    device = torch.device("cuda", rank) if spec.device_type == "cuda" else torch.device("cpu")
    store = dist.TCPStore(host, port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
    store.set(f"{STORE_PREFIX}/started/{rank}", str(os.getpid()))
    try:
        run_worker(rank, world, device, store, spec)
    except BaseException:  # the driver reads the reported error; the traceback is for whoever reads the logs
        print(f"qwen2-triton: tensor-parallel rank {rank} stopped:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _exit_when_closed(conn) -> None:
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)
