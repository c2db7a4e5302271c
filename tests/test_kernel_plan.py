"""Kernel selection per device (runtime/kernel_plan.py) and attention tuning with its on-disk cache
(runtime/tuning.py). Devices are described by hand (DeviceInfo.assume) and timings come from fake timers, so
every rule is checked without a GPU; the timers' real launches run through the interpreter."""
import json

import pytest
import torch

from tuning_fakes import fake_timer
from qwen2_triton.kernels import launch
from qwen2_triton.runtime import tuning
from qwen2_triton.runtime.kernel_plan import AttentionShape, DeviceInfo, attention_keys, choose_dtype, \
    choose_kernels, plan_kernels
from qwen2_triton.runtime.tuning import TuningCache, config_label, tune

CPU = DeviceInfo("cpu", "CPU (test)")
SHAPE_05B = AttentionShape(14, 2, 64, 16)


@pytest.mark.parametrize("arch,kernels,dtype", [("sm_75", "torch", torch.float16), ("sm_80", "triton", torch.bfloat16),
                                                ("sm_86", "triton", torch.bfloat16), ("sm_89", "triton", torch.bfloat16),
                                                ("sm_90", "triton", torch.bfloat16)])
def test_auto_choices_per_capability(arch, kernels, dtype):
    info = DeviceInfo.assume(arch)
    assert choose_kernels("auto", info)[0] == kernels
    got, why = choose_dtype("auto", info)
    assert got == dtype and arch in why


def test_cpu_choices(monkeypatch):
    assert choose_kernels("auto", CPU)[0] == "torch"
    assert choose_dtype("auto", CPU)[0] == torch.float32
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        choose_kernels("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_kernels("triton", CPU)[0] == "triton"


def test_unsupported_requests_are_clear_errors():
    old = DeviceInfo.assume("sm_75")
    with pytest.raises(ValueError, match="needs compute capability sm_80.*sm_75.*kernels='torch'"):
        choose_kernels("triton", old)
    with pytest.raises(ValueError, match="bfloat16 needs sm_80.*dtype='float16'"):
        choose_dtype("bfloat16", old)
    with pytest.raises(ValueError, match="kernels must be one of"):
        choose_kernels("cuda", CPU)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        choose_dtype("int8", CPU)
    with pytest.raises(ValueError, match="unsupported dtype torch.int8"):
        choose_dtype(torch.int8, CPU)
    assert choose_dtype(torch.float16, old)[0] == torch.float16


def test_shared_memory_decides_the_candidates():
    assert DeviceInfo.assume("sm_86").shared_bytes == 101376 < DeviceInfo.assume("sm_80").shared_bytes
    # sm_80 and sm_86: the same MMA family (mma.sync), 163 KB against 99 KB per block
    pre86, pre80 = (set(launch.prefill_candidates(128, torch.bfloat16, cap)) for cap in (86, 80))
    assert pre86 <= pre80
    big = launch.decode_candidates(128, torch.bfloat16, 7, 80)
    small = launch.decode_candidates(128, torch.bfloat16, 7, 86)
    assert set(small) < set(big)
    assert all(launch.attn_shared_estimate(c, 128, 2, 86) <= 101376 for c in small)


# ------------------------------------------------------------------------------------------------ tune()
CANDS = launch.decode_candidates(64, torch.bfloat16, 7, 90)


def test_tune_picks_the_fastest_and_caches_it(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    times = {config_label(c): 1.0 + i for i, c in enumerate(CANDS)}
    times[config_label(CANDS[3])] = 0.5
    r = tune("gpu|sm_90|triton x|decode|b", CANDS, fake_timer(times), cache)
    assert (r.config, r.source) == (CANDS[3], "tuned") and "0.5000 ms vs 1.0000 ms for the default" in r.detail
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["gpu|sm_90|triton x|decode|b"]["config"]["BLOCK_N"] == CANDS[3].BLOCK_N
    assert len(saved["gpu|sm_90|triton x|decode|b"]["timings"]) == len(CANDS)
    # a restart: a fresh cache object on the same file answers without timing anything
    calls = []
    again = tune("gpu|sm_90|triton x|decode|b", CANDS, fake_timer(times, calls), TuningCache(tmp_path / "t.json"))
    assert (again.config, again.source, calls) == (CANDS[3], "cache", [])


def test_other_gpu_or_triton_version_tunes_again(tmp_path):
    cache = TuningCache(tmp_path / "t.json")
    times = {config_label(c): 1.0 + i for i, c in enumerate(CANDS)}
    info = DeviceInfo.assume("sm_90")
    keys = attention_keys(info, torch.bfloat16, SHAPE_05B)
    tune(keys["decode"], CANDS, fake_timer(times), cache)
    other_gpu = attention_keys(DeviceInfo.assume("sm_80"), torch.bfloat16, SHAPE_05B)["decode"]
    other_shape = attention_keys(info, torch.bfloat16, AttentionShape(28, 4, 128, 16))["decode"]
    other_triton = tuning.tuning_key(info.name, 90, "0.0", "decode", keys["decode"].split("|")[-1])
    assert f"src={tuning.kernel_source_hash('decode')}" in keys["decode"]
    other_source = keys["decode"].replace(tuning.kernel_source_hash("decode"), "00000000")
    for key in (other_gpu, other_shape, other_triton, other_source):
        calls = []
        assert tune(key, CANDS, fake_timer(times, calls), cache).source == "tuned" and len(calls) == len(CANDS)


def test_noise_does_not_replace_the_default(tmp_path):
    times = {config_label(c): 1.0 for c in CANDS}
    times[config_label(CANDS[2])] = 0.98  # 2% faster: within MIN_GAIN
    r = tune("k", CANDS, fake_timer(times), TuningCache(tmp_path / "t.json"))
    assert r.config == CANDS[0] and r.source == "tuned"


def test_candidates_that_do_not_fit_are_skipped(tmp_path):
    from triton.runtime.errors import OutOfResources

    times = {config_label(c): 2.0 for c in CANDS}
    times[config_label(CANDS[0])] = OutOfResources(300000, 232448, "shared memory")
    times[config_label(CANDS[1])] = 1.5
    r = tune("k", CANDS, fake_timer(times), TuningCache(tmp_path / "t.json"))
    assert r.config == CANDS[1] and f"skipped {config_label(CANDS[0])}: OutOfResources" in r.detail
    none = {config_label(c): OutOfResources(1, 0, "shared memory") for c in CANDS}
    with pytest.raises(RuntimeError, match="none of the 6 attention tile candidates .* OutOfResources"):
        tune("gpu|sm_90|triton x|decode|b", CANDS, fake_timer(none), TuningCache(tmp_path / "u.json"))
    assert not (tmp_path / "u.json").exists()


def test_a_bug_in_a_candidate_is_not_swallowed(tmp_path):
    times = {config_label(c): 1.0 for c in CANDS}
    times[config_label(CANDS[1])] = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tune("k", CANDS, fake_timer(times), TuningCache(tmp_path / "t.json"))


def test_stale_or_corrupt_cache_is_tuned_again(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"k": {"config": {"BLOCK_M": 16, "BLOCK_N": 256, "num_warps": 1, "num_stages": 9}}}))
    times = {config_label(c): 1.0 + i for i, c in enumerate(CANDS)}
    calls = []
    r = tune("k", CANDS, fake_timer(times, calls), TuningCache(path))  # cached choice no longer a candidate
    assert r.source == "tuned" and len(calls) == len(CANDS)
    path.write_text('{"k": {"config": ')  # cut short
    cache = TuningCache(path)
    assert "unreadable" in cache.problem and "unreadable" in capsys.readouterr().err
    assert tune("k", CANDS, fake_timer(times), cache).source == "tuned"
    assert json.loads(path.read_text())["k"]["config"]["BLOCK_N"] == CANDS[0].BLOCK_N  # rewritten whole


def test_cached_entry_with_wrong_types_is_not_used(tmp_path):
    """64.0 == 64, so a float entry would pass 'in candidates' and reach a constexpr as a float."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"k": {"config": {"BLOCK_M": 16.0, "BLOCK_N": 64.0, "num_warps": 4,
                                                 "num_stages": 2, "dot_precision": "tf32"}}}))
    calls = []
    r = tune("k", CANDS, fake_timer({config_label(c): 1.0 for c in CANDS}, calls), TuningCache(path))
    assert r.source == "tuned" and len(calls) == len(CANDS) and type(r.config.BLOCK_M) is int


def test_no_home_directory_keeps_tunings_in_memory(monkeypatch, capsys):
    monkeypatch.delenv("QWEN2_TRITON_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(tuning.Path, "home", staticmethod(no_home))
    cache = TuningCache()
    assert cache.path is None and "QWEN2_TRITON_CACHE" in capsys.readouterr().err
    times = {config_label(c): 1.0 + i for i, c in enumerate(CANDS)}
    assert tune("k", CANDS, fake_timer(times), cache).source == "tuned"
    assert tune("k", CANDS, fake_timer({}), cache).source == "cache"  # remembered for this process


def test_unwritable_cache_keeps_serving(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    times = {config_label(c): 1.0 + i for i, c in enumerate(CANDS)}
    r = tune("k", CANDS, fake_timer(times), TuningCache(blocker / "sub" / "t.json"))  # parent is a file
    assert r.source == "tuned" and "could not write the tuning cache" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ plan_kernels()
def test_plan_tunes_on_a_gpu_and_reuses_the_cache(tmp_path):
    info = DeviceInfo.assume("sm_90")
    pre = launch.prefill_candidates(64, torch.bfloat16, 90)
    dec = launch.decode_candidates(64, torch.bfloat16, 7, 90)
    timers = {"prefill": fake_timer({config_label(c): (0.1 if c == pre[2] else 1.0) for c in pre}),
              "decode": fake_timer({config_label(c): 1.0 for c in dec})}
    cache = TuningCache(tmp_path / "t.json")
    plan = plan_kernels(info, torch.bfloat16, "triton", SHAPE_05B, tune_now=True, cache=cache, timers=timers)
    assert plan.prefill.config == pre[2] and plan.decode.config == dec[0]
    text = "\n".join(plan.describe())
    assert "H100" in text and f"prefill attention tiles {config_label(pre[2])}" in text
    boom = {"prefill": fake_timer({}), "decode": fake_timer({})}  # any timing would raise KeyError
    again = plan_kernels(info, torch.bfloat16, "triton", SHAPE_05B, tune_now=True,
                         cache=TuningCache(tmp_path / "t.json"), timers=boom)
    assert again.prefill.source == again.decode.source == "cache" and again.prefill.config == pre[2]


def test_a_cached_start_builds_no_timing_data(tmp_path, monkeypatch):
    """Random paged batches (hundreds of MB for Qwen1.5-4B) are made only when something must be timed."""
    info = DeviceInfo.assume("sm_90")
    cache = TuningCache(tmp_path / "t.json")
    for kernel, key in attention_keys(info, torch.bfloat16, SHAPE_05B).items():
        cands = (launch.prefill_candidates(64, torch.bfloat16, 90) if kernel == "prefill"
                 else launch.decode_candidates(64, torch.bfloat16, 7, 90))
        cache.put(key, cands[1], {config_label(cands[1]): 1.0})

    def no_timers(*a, **k):
        raise AssertionError("timing data built although the cache had the answer")
    monkeypatch.setattr("qwen2_triton.runtime.kernel_plan.attention_timers", no_timers)
    plan = plan_kernels(info, torch.bfloat16, "triton", SHAPE_05B, tune_now=True, cache=TuningCache(tmp_path / "t.json"))
    assert plan.prefill.source == plan.decode.source == "cache"


def test_plan_without_tuning_keeps_the_heuristics():
    info = DeviceInfo.assume("sm_86")
    off = plan_kernels(info, torch.bfloat16, "triton", SHAPE_05B, tune_now=False)
    assert off.prefill.config == launch.prefill_config(64, torch.bfloat16)
    assert off.decode.config == launch.decode_config(64, torch.bfloat16, 7) and "tuning off" in off.decode.detail
    cpu = plan_kernels(CPU, torch.float32, "triton", SHAPE_05B, tune_now=True)
    assert cpu.prefill.source == "default" and "no GPU" in cpu.prefill.detail
    assert plan_kernels(info, torch.bfloat16, "torch", SHAPE_05B, tune_now=True).prefill is None


def test_timers_launch_each_candidate(monkeypatch, device):
    """The real timing functions launch the kernels with the config they are given (here through the
    interpreter, on small shapes, with a bench that runs once)."""
    monkeypatch.setattr(tuning, "SHAPES", {"prefill": [dict(q_len=40, seq_len=70, batch=2)],
                                           "decode": [dict(q_len=1, seq_len=90, batch=3),
                                                      dict(q_len=1, seq_len=20, batch=1)]})
    ran = []
    timers = tuning.attention_timers(device, torch.bfloat16, 7, 1, 64, 16, None,
                                     bench=lambda fn: (fn(), ran.append(1), 0.25)[-1])  # geomean of 0.25s: 0.25
    for kernel, cands in (("prefill", launch.prefill_candidates(64, torch.bfloat16, 90)),
                          ("decode", launch.decode_candidates(64, torch.bfloat16, 7, 90))):
        for cfg in cands[:2]:
            assert timers[kernel](cfg) == pytest.approx(0.25)
    assert len(ran) == 2 * 1 + 2 * 2  # each decode config over both decode cases


def test_llm_plans_before_it_runs(tmp_path, qwen_tokenizer_dir, device):
    """LLM builds its plan at start-up and hands the attention tiles to the Triton ops (interpreter here)."""
    from checkpoints import make_checkpoint
    from qwen2_triton import LLM, SamplingParams

    make_checkpoint(str(tmp_path), "qwen2-0.5b", qwen_tokenizer_dir)
    llm = LLM(str(tmp_path), kernels="triton", device=str(device), dtype="float32", progress=False,
              tuning_cache=str(tmp_path / "t.json"))
    text = "\n".join(llm.plan.describe())
    assert "kernels=triton" in text and "dtype float32" in text and "prefill attention tiles" in text
    assert llm.ops.prefill_cfg == llm.plan.prefill.config and llm.ops.decode_cfg == llm.plan.decode.config
    assert llm.generate([1, 2, 3], SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids
    cpu = LLM(str(tmp_path), progress=False, tune=False)
    assert cpu.plan.kernels == "torch" and cpu.plan.prefill is None
