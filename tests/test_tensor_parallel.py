"""Tensor parallelism on the CPU (gloo): the sharded model against HF, against one process, and its lifecycle.

Each engine here spawns real worker processes (a few seconds each on a loaded 2-core machine), so every test
builds at most one and checks several things on it. The seeds cover: one KV head on 2 ranks (KV-head
replication, tied vocab-parallel embedding), MHA, an untied 152064-row vocabulary, and 4 ranks over 2 KV heads
(each replicated twice: a wrong head-to-rank mapping fails there).
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.distributed as dist

from checkpoints import hf_prompt_logprobs, make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.model.config import Qwen2Config
from qwen2_triton.model.sharding import TPShard, check_divisible
from qwen2_triton.runtime.parallel_state import TensorParallelError
from test_model_vs_hf import TOL, long_prompt

# float32 as tests/test_model_vs_hf.py; a tight KV pool (6 blocks) so the batch below is preempted
ENGINE = dict(dtype="float32", device="cpu", kernels="torch", progress=False, max_num_batched_tokens=48,
              max_num_seqs=4, kv_cache_tokens=96, block_size=16)
PROMPT = 80  # tokens of the log-prob prompt: prefilled in two chunks
DEADLINE_S = 60  # a failure must surface well within this (gloo sees a dead peer's closed socket at once)


@pytest.fixture(scope="module")
def ckpts(module_tmp, qwen_tokenizer_dir):
    cache = {}

    def make(seed):
        if seed not in cache:
            path = module_tmp(f"tp-{seed}")
            cache[seed] = (path, make_checkpoint(path, seed, qwen_tokenizer_dir, rng_seed=7))
        return cache[seed]

    return make


def prompt_logprobs(llm, ids) -> torch.Tensor:
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    return torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


def greedy_batch(llm) -> tuple[list[list[int]], int]:
    """Five requests of different lengths through 4 slots and 6 KV blocks: continuous batching (requests join as
    others finish) and preemption (the pool cannot hold every running sequence)."""
    base = long_prompt(llm.tokenizer)
    prompts = [base[i * 17: i * 17 + 9 + 5 * i] for i in range(5)]
    params = [SamplingParams(max_tokens=12 + 2 * i, temperature=0, ignore_eos=True) for i in range(5)]
    before = llm.stats()["preemptions"]
    outs = llm.generate(prompts, params)
    return [o.outputs[0].token_ids for o in outs], llm.stats()["preemptions"] - before


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pids, timeout=DEADLINE_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("seed,greedy", [("gqa-1kv", True), ("qwen1.5-4b", False), ("qwen2-7b", False)])
def test_two_ranks_match_hf_and_one_process(ckpts, seed, greedy):
    """Prompt log-probs against HF; with ``greedy``, the tokens of a batch that is preempted on the way against
    one process (one seed: the batch costs two engines' worth of steps on this machine)."""
    path, hf = ckpts(seed)
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    pids = [p.pid for p in llm.core.tp.procs]
    assert llm.model.local_cfg.num_attention_heads == hf.config.num_attention_heads // 2
    assert llm.runner.kv_caches[0][0].shape[2] == max(1, hf.config.num_key_value_heads // 2)  # KV heads per rank
    ids = long_prompt(llm.tokenizer)[:PROMPT]
    ref = hf_prompt_logprobs(hf, ids)
    assert ref.std() > 0.3
    torch.testing.assert_close(prompt_logprobs(llm, ids), ref, atol=TOL, rtol=0)
    if greedy:
        tokens, preempted = greedy_batch(llm)
    if seed == "gqa-1kv":  # dropped, not closed: garbage collection stops the workers too
        del llm
        gc.collect()
        assert wait_gone(pids) == [] and not dist.is_initialized()
    else:
        llm.close()
        assert wait_gone(pids, 0) == []  # close() joins them
    if not greedy:
        return
    with LLM(path, **ENGINE) as one:
        ref_tokens, ref_preempted = greedy_batch(one)
    assert preempted > 0 and preempted == ref_preempted
    assert tokens == ref_tokens


def test_four_ranks_replicate_kv_heads(ckpts):
    """Qwen2-1.5B's shape (12 heads, 2 KV heads) on 4 ranks: ranks 0,1 hold KV head 0 and ranks 2,3 head 1."""
    path, hf = ckpts("qwen2-1.5b")
    assert [TPShard(Qwen2Config.from_file(f"{path}/config.json"), r, 4).kv_head_start for r in range(4)] == \
        [0, 0, 1, 1]
    with LLM(path, tensor_parallel_size=4, **ENGINE) as llm:
        ids = long_prompt(llm.tokenizer)[:PROMPT]
        torch.testing.assert_close(prompt_logprobs(llm, ids), hf_prompt_logprobs(hf, ids), atol=TOL, rtol=0)


def test_killed_worker_fails_generate_fast_and_leaves_no_process(ckpts):
    path, _ = ckpts("gqa-1kv")
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    (worker,) = llm.core.tp.procs
    reduce, calls = llm.model.tp.all_reduce, []

    def kill_mid_step(x):  # inside the 6th step's forward, between the driver's collectives
        calls.append(1)
        if len(calls) == 6 * 5:  # 5 collectives a step: embedding + 2 per layer
            os.kill(worker.pid, signal.SIGKILL)
        return reduce(x)

    llm.model.tp.all_reduce = kill_mid_step
    box = {}

    def run():
        try:
            llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t0 = time.monotonic()
    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(DEADLINE_S)
    assert not th.is_alive(), f"generate() still running {DEADLINE_S} s after its worker was killed"
    assert time.monotonic() - t0 < 30
    assert isinstance(box.get("error"), TensorParallelError)
    assert f"rank 1 (pid {worker.pid}) was killed by SIGKILL" in str(box["error"])
    assert not worker.is_alive() and not dist.is_initialized()
    with pytest.raises(TensorParallelError, match="failed earlier"):  # the engine stays stopped, no hang
        llm.generate([1, 2], SamplingParams(max_tokens=2))
    llm.close()


BREAK_WORKERS = """
import os, sys
if "--multiprocessing-fork" in sys.argv:  # a spawned child, not the test process
    if os.environ["TP_TEST_BREAK"] == "exit":
        os._exit(3)
    import qwen2_triton.model.loader as loader

    def load_model(*args, **kwargs):
        raise RuntimeError("planted failure while loading the shard")

    loader.load_model = load_model
"""


@pytest.mark.parametrize("how,message", [
    ("exit", r"rank 1 \(pid \d+\) exited with status 3 before joining the group"),
    ("raise", r"rank 1 \(pid \d+\) failed: RuntimeError: planted failure while loading the shard"),
])
def test_a_rank_that_fails_to_start_is_named(ckpts, tmp_path, monkeypatch, how, message):
    """A worker that dies before joining (a broken environment), or raises while loading, fails LLM(...) with
    its rank and cause; nothing is left running."""
    path, _ = ckpts("gqa-1kv")
    (tmp_path / "sitecustomize.py").write_text(BREAK_WORKERS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TP_TEST_BREAK", how)
    before = {p.pid for p in __import__("multiprocessing").active_children()}
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match=message):
        LLM(path, tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - t0 < DEADLINE_S
    assert {p.pid for p in __import__("multiprocessing").active_children()} <= before
    assert not dist.is_initialized()


DRIVER = """
import os, sys
from qwen2_triton import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(sys.argv[1], tensor_parallel_size=2, dtype="float32", device="cpu", kernels="torch", progress=False,
              kv_cache_tokens=128)
    llm.generate([1, 2, 3], SamplingParams(max_tokens=2))
    print(llm.core.tp.procs[0].pid, flush=True)
    os.kill(os.getpid(), 9)  # the driver dies without closing anything
"""


def test_workers_exit_when_the_driver_dies(ckpts, tmp_path):
    path, _ = ckpts("gqa-1kv")
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    run = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    worker = int(run.stdout.split()[-1])
    assert wait_gone([worker], 30) == [], "the worker outlived its driver"


TORCHRUN_SCRIPT = """
import os, sys
from qwen2_triton import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=int(os.environ["WORLD_SIZE"]), dtype="float32", device="cpu",
          kernels="torch", progress=False, kv_cache_tokens=96)
# only rank 0 gets here; the others serve inside LLM(...) and leave when rank 0 closes it, or when its process
# ends with the LLM still open (the module-global keeps it alive until interpreter exit)
out = llm.generate([[1, 2, 3, 4], [5, 6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
print("tokens", [o.outputs[0].token_ids for o in out], flush=True)
if sys.argv[2] == "close":
    llm.close()
"""


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_torchrun_forms_the_group_and_rank_0_drives(ckpts, tmp_path, ending):
    path, _ = ckpts("gqa-1kv")
    script = tmp_path / "tp_torchrun.py"
    script.write_text(TORCHRUN_SCRIPT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), path, ending], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]  # every rank exited 0
    (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("tokens")]  # printed by rank 0 alone
    with LLM(path, **ENGINE) as one:
        out = one.generate([[1, 2, 3, 4], [5, 6]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert line == f"tokens {[o.outputs[0].token_ids for o in out]}"


# ------------------------------------------------------------------------------- bad input, before any process
def test_sizes_that_do_not_divide_are_refused_before_anything_starts(ckpts):
    path, _ = ckpts("qwen1.5-4b")  # 20 heads, 20 KV heads, intermediate 136
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the 20 attention heads.*"
                                         r"\[1, 2, 4, 5, 10, 20\]"):
        LLM(path, tensor_parallel_size=3, **ENGINE)
    cfg = Qwen2Config.from_file(f"{path}/config.json")
    from dataclasses import replace

    with pytest.raises(ValueError, match="does not divide intermediate_size 130"):
        check_divisible(replace(cfg, intermediate_size=130), 4)
    with pytest.raises(ValueError, match="exceeds the 4 KV heads .* not a multiple"):
        check_divisible(replace(cfg, num_attention_heads=24, num_key_value_heads=4, intermediate_size=144), 6)
    with pytest.raises(ValueError, match="does not divide the 4 KV heads"):
        check_divisible(replace(cfg, num_attention_heads=24, num_key_value_heads=4, intermediate_size=144), 3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(path, tensor_parallel_size=0, **ENGINE)
    assert not dist.is_initialized()


def test_cli_flag_reaches_the_engine_and_errors_name_it(ckpts, capsys):
    from qwen2_triton.cli import ENGINE_FLAGS, main

    assert "tensor_parallel_size" in ENGINE_FLAGS  # generate, chat and serve all build their engine from these
    path, _ = ckpts("qwen1.5-4b")
    assert main(["generate", "--model", path, "--device", "cpu", "-tp", "3", "hello"]) == 2
    assert "--tensor-parallel-size 3 does not divide the 20 attention heads" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_env_reports_the_parallel_layout(capsys):
    from qwen2_triton.runtime.env_report import main

    assert main(["--arch", "sm_90", "-tp", "4"]) == 0  # bfloat16: the all-reduce bytes of a GPU run
    out = capsys.readouterr().out
    assert "Qwen2-1.5B  per rank 3/12 heads, 1/2 KV heads (each on 2 ranks), 2240/8960 MLP columns, " \
           "37984/151936 vocabulary rows; per token 2 all-reduces per layer of 3,072 B each" in out
    assert "Qwen2-7B    per rank 7/28 heads, 1/4 KV heads, 4736/18944 MLP columns, 38016/152064" in out
    assert main(["--arch", "sm_90", "-tp", "8"]) == 0
    assert "Qwen1.5-4B  does not split: tensor_parallel_size=8 does not divide the 20 attention heads" in \
        capsys.readouterr().out


def test_bench_e2e_runs_sharded_random_weights(tmp_path):
    """bench e2e -tp 2 (meant for GPUs) as a CPU smoke test: every rank draws its own shard of the random
    weights (model/loader.py RandomWeights), and the row says how many GPUs its figures are per."""
    import csv

    from qwen2_triton.bench.e2e import main

    out = tmp_path / "e2e.csv"
    assert main(["--tiny", "--models", "qwen2-1.5b", "-tp", "2", "--no-hf", "--decode-tokens", "4", "--prefill",
                 "32", "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["tensor_parallel_size"] == "2" and float(row["offline_out_tok_s"]) > 0
    assert not dist.is_initialized()


def test_more_ranks_than_gpus_and_in_memory_models_are_refused(monkeypatch):
    from qwen2_triton.runtime.tp_driver import tp_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs; 1 visible"):
        tp_device(torch.device("cuda"), 2)
    with pytest.raises(ValueError, match="rank r runs on cuda:r"):
        tp_device(torch.device("cuda", 1), 2)
    from qwen2_triton.model.loader import LoadedModel
    from qwen2_triton.runtime.engine_config import EngineConfig

    with pytest.raises(ValueError, match="needs a model path"):
        EngineConfig(model=LoadedModel(model=None, tokenizer=None), tensor_parallel_size=2)


def test_mixed_device_types_are_refused_before_the_group_forms():
    from qwen2_triton.runtime.parallel_state import init_groups

    store = dist.HashStore()
    store.set("qwen2_triton/tp/device/1", "cuda")  # what a rank on a GPU machine announced
    with pytest.raises(ValueError, match="rank 0: cpu, rank 1: cuda"):
        init_groups(0, 2, torch.device("cpu"), store)
    assert not dist.is_initialized()
