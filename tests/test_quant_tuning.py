"""Launch configs of the quantized linears chosen by the kernel plan (runtime/quant_tuning.py) with the tuning cache
(runtime/tuning.py): fake timers stand in for a GPU, a recorder for the kernel launch, and every candidate runs
through the interpreter against the plain-torch reference."""
import json

import pytest
import torch

from tuning_fakes import fake_timer
from qwen2_triton.kernels import gguf_linear as gguf_mod
from qwen2_triton.kernels import quant_linear as quant_mod
from qwen2_triton.kernels.gguf_linear import FusedGGUFWeight, gguf_linear, gguf_linear_ref
from qwen2_triton.kernels.quant_linear import FusedQuantWeight, QuantConfig, quant_config, quant_linear, \
    quant_linear_ref
from qwen2_triton.kernels.testing import poisoned_allocations
from qwen2_triton.runtime.kernel_plan import AttentionShape, DeviceInfo, plan_kernels
from qwen2_triton.runtime.quant_tuning import LAUNCH_ROWS, QuantShape, candidates, plan_quant, quant_key, \
    quant_shapes, random_weight, shape_of
from qwen2_triton.runtime.tuning import TuningCache, config_label

H100 = DeviceInfo.assume("sm_90")  # 132 SMs
BF16_TOL = dict(atol=2e-2, rtol=2 ** -7)  # one bf16 rounding of the same fp32 sum (tests/test_kernel_quant_linear.py)
# Small odd shapes: N not a multiple of any BLOCK_N, three K groups, K-quant super-blocks
INT4 = QuantShape("int4+zeros+perm", 4, 128, 100, 384)
INT8 = QuantShape("int8", 8, 64, 72, 384)
Q4K = QuantShape("Q4_K", 4, 32, 100, 512)
Q6K = QuantShape("Q6_K", 6, 16, 40, 256)
ATTN = AttentionShape(14, 2, 64, 16)


def _fake_timers(shapes, pick: dict, calls: list | None = None):
    """Per (shape, launch): the default 1.0 ms, the others 1.5, except ``pick[(shape, launch)] = (index, ms)``."""
    timers = {}
    for s in shapes:
        for launch in LAUNCH_ROWS:
            c = candidates(s, launch, torch.bfloat16, H100.sm_count)
            times = {config_label(x): (1.0 if i == 0 else 1.5) for i, x in enumerate(c)}
            if (s, launch) in pick:
                i, ms = pick[s, launch]
                times[config_label(c[i])] = ms
            timers[s, launch] = fake_timer(times, calls)
    return timers


# ------------------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("shape", [INT4, INT8, Q4K, Q6K], ids=lambda s: s.format)
@pytest.mark.parametrize("launch,rows", [("decode", 3), ("small", 19), ("prefill", 37)])
def test_every_candidate_matches_the_reference(shape, launch, rows, device):
    """Each GPU candidate (an H100's split counts) through the launcher at a small odd shape, bf16."""
    cands = candidates(shape, launch, torch.bfloat16, H100.sm_count)
    assert 2 <= len(cands) <= 4 and cands[0] == quant_config(LAUNCH_ROWS[launch], shape.n, shape.k,
                                                             shape.k if shape.format[0] == "Q" else shape.group,
                                                             torch.bfloat16, H100.sm_count)
    w = random_weight(shape, torch.device(device))
    assert shape_of(w) == shape
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, shape.k, generator=g).to(torch.bfloat16).to(device)
    bias = torch.randn(shape.n, generator=g).to(torch.bfloat16).to(device)
    fn, ref = (gguf_linear, gguf_linear_ref) if shape.kernel == "gguf_linear" else (quant_linear, quant_linear_ref)
    want = ref(x, w, bias)
    assert want.float().abs().max() > 0.1  # not a trivially small output
    for cfg in cands:
        with poisoned_allocations():
            got = fn(x, w, bias, config=cfg)
        torch.testing.assert_close(got, want, **BF16_TOL, msg=lambda m, c=cfg: f"{config_label(c)}: {m}")


def test_no_gpu_or_fp32_has_the_heuristic_alone():
    assert len(candidates(INT4, "decode", torch.bfloat16, None)) == 1
    assert len(candidates(Q4K, "prefill", torch.float32, 132)) == 1


# ------------------------------------------------------------------------------------------- tuning
def test_the_fastest_wins_only_by_3_percent_and_is_cached(tmp_path):
    shapes = {INT4: None, Q4K: None}
    pick = {(INT4, "decode"): (2, 0.5), (INT4, "prefill"): (1, 0.98),  # 2% faster: noise, the default stays
            (Q4K, "prefill"): (2, 0.9)}
    cache = TuningCache(tmp_path / "t.json")
    results, cands = plan_quant(H100, torch.bfloat16, shapes, tune_now=True, cache=cache,
                                timers=_fake_timers(shapes, pick))
    assert results[INT4, "decode"].config == cands[INT4, "decode"][2]
    assert results[INT4, "prefill"].config == cands[INT4, "prefill"][0]
    assert results[Q4K, "decode"].config == cands[Q4K, "decode"][0]
    assert results[Q4K, "prefill"].config == cands[Q4K, "prefill"][2]
    assert {r.source for r in results.values()} == {"tuned"}
    saved = json.loads((tmp_path / "t.json").read_text())
    key = quant_key(H100, torch.bfloat16, INT4, "decode")
    assert key.startswith(f"{H100.name}|sm_90|triton ") and "|quant_linear.decode|bfloat16 int4+zeros+perm " in key
    assert saved[key]["config"] == {f: getattr(cands[INT4, "decode"][2], f) for f in QuantConfig.__annotations__}
    assert len(saved) == 6  # 2 shapes x 3 launch shapes
    # a second start on the same file: the cache answers, nothing is timed
    calls = []
    again, _ = plan_quant(H100, torch.bfloat16, shapes, tune_now=True, cache=TuningCache(tmp_path / "t.json"),
                          timers=_fake_timers(shapes, {}, calls))
    assert calls == [] and {r.source for r in again.values()} == {"cache"}
    assert {k: r.config for k, r in again.items()} == {k: r.config for k, r in results.items()}
    # another shape, GPU or dtype is another key: tuned, not served this one's choice
    assert quant_key(H100, torch.bfloat16, QuantShape("int4+zeros+perm", 4, 128, 104, 384), "decode") != key
    assert quant_key(DeviceInfo.assume("sm_80"), torch.bfloat16, INT4, "decode") != key
    assert quant_key(H100, torch.float16, INT4, "decode") != key


def test_a_candidate_that_cannot_compile_is_skipped(tmp_path):
    from triton.runtime.errors import OutOfResources

    c = candidates(INT4, "decode", torch.bfloat16, H100.sm_count)
    times = {config_label(x): 1.0 for x in c}
    times[config_label(c[1])] = OutOfResources(300000, 232448, "shared memory")
    times[config_label(c[2])] = 0.7
    timers = _fake_timers({INT4: None}, {})
    timers[INT4, "decode"] = fake_timer(times)
    results, _ = plan_quant(H100, torch.bfloat16, {INT4: None}, tune_now=True, cache=TuningCache(tmp_path / "t.json"),
                            timers=timers)
    r = results[INT4, "decode"]
    assert r.config == c[2] and f"skipped {config_label(c[1])}: OutOfResources" in r.detail


def test_no_timing_without_a_gpu_or_with_tuning_off(tmp_path):
    boom = {(s, launch): fake_timer({}) for s in (INT4,) for launch in LAUNCH_ROWS}  # any timing: KeyError
    for info, tune_now, why in ((DeviceInfo("cpu", "CPU (test)"), True, "no GPU"), (H100, False, "tuning off")):
        results, cands = plan_quant(info, torch.bfloat16, {INT4: None}, tune_now=tune_now,
                                    cache=TuningCache(tmp_path / "t.json"), timers=boom)
        assert all(r.source == "default" and why in r.detail and r.config == cands[k][0]
                   for k, r in results.items())
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------------------------------- reaching the launch
class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's config instead of running it."""

    def __init__(self):
        self.configs = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.configs.append(QuantConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], grid[2], kw["num_warps"],
                                            kw["num_stages"]))
        return launch

    def take(self) -> list[QuantConfig]:
        out, self.configs = self.configs, []
        return out


def test_the_chosen_config_is_what_the_kernel_is_launched_with(tmp_path, monkeypatch, device):
    """TritonOps after use_plan: a tuned choice reaches the launch of every weight of its shape (fused parts too),
    at every row count of its launch shape (8 rows is still decode, 9 is prefill); a heuristic choice is left to
    the launcher, as without a plan."""
    from qwen2_triton.runtime.triton_backend import TritonOps

    dev = torch.device(device)
    q6k = QuantShape("Q6_K", 6, 16, 40, 512)
    w4, w8, wq4, wq6 = (random_weight(s, dev) for s in (INT4, INT8, Q4K, q6k))
    params = {"a": w4, "b": FusedQuantWeight((w4, w8)), "c": FusedGGUFWeight((wq4, wq6)), "dense": torch.zeros(3)}
    shapes = quant_shapes(params)
    assert set(shapes) == {INT4, INT8, Q4K, q6k} and shapes[INT4] is w4
    pick = {(INT4, "decode"): (2, 0.5), (INT4, "small"): (1, 0.5), (INT4, "prefill"): (1, 0.5),
            (Q4K, "decode"): (1, 0.5)}
    plan = plan_kernels(H100, torch.bfloat16, "triton", ATTN, tune_now=True, cache=TuningCache(tmp_path / "t.json"),
                        timers={"prefill": lambda c: 1.0, "decode": lambda c: 1.0}, quant=shapes,
                        quant_timers=_fake_timers(shapes, pick))
    assert "quant_linear int4+zeros+perm g128 N=100 K=384: decode " in "\n".join(plan.describe())
    chosen = {k: plan.quant[k].config for k in pick}
    assert all(chosen[k] == plan.quant_candidates[k][pick[k][0]] for k in pick)
    assert set(plan.quant_configs()) == set(pick)  # the heuristic's choices are not passed on
    ops = TritonOps(dev)
    ops.use_plan(plan)
    rec_q, rec_g = _Recorder(), _Recorder()
    monkeypatch.setattr(quant_mod, "quant_linear_kernel", rec_q)
    monkeypatch.setattr(gguf_mod, "gguf_linear_kernel", rec_g)
    for rows, launch in ((1, "decode"), (8, "decode"), (9, "small"), (32, "small"), (33, "prefill")):
        x = torch.zeros(rows, 384, dtype=torch.bfloat16, device=dev)
        ops.linear(x, params["a"])
        ops.linear(x, params["b"])
        int8_default = quant_config(rows, INT8.n, INT8.k, INT8.group, torch.bfloat16, ops.sm_count)
        assert rec_q.take() == [chosen[INT4, launch], chosen[INT4, launch], int8_default], (rows, launch)
        ops.linear(torch.zeros(rows, 512, dtype=torch.bfloat16, device=dev), params["c"])
        q4k_cfg = chosen.get((Q4K, launch)) or quant_config(rows, Q4K.n, Q4K.k, Q4K.k, torch.bfloat16, ops.sm_count)
        q6k_default = quant_config(rows, q6k.n, q6k.k, q6k.k, torch.bfloat16, ops.sm_count)
        assert rec_g.take() == [q4k_cfg, q6k_default], (rows, launch)
    # without a plan: the launchers' heuristics, exactly as before
    bare = TritonOps(dev)
    bare.linear(torch.zeros(1, 384, dtype=torch.bfloat16, device=dev), w4)
    assert rec_q.take() == [quant_config(1, INT4.n, INT4.k, INT4.group, torch.bfloat16, bare.sm_count)]


@pytest.mark.parametrize("shape", [INT4, Q4K], ids=lambda s: s.format)
def test_the_timer_launches_the_config_it_times(shape, monkeypatch, device):
    """runtime/quant_tuning.py ``quant_timer`` (do_bench replaced by one call) on a random weight of the layout,
    at the launch shape's rows: each candidate is launched as given."""
    from qwen2_triton.runtime.quant_tuning import quant_timer

    rec = _Recorder()
    monkeypatch.setattr(gguf_mod if shape.kernel == "gguf_linear" else quant_mod, f"{shape.kernel}_kernel", rec)
    for launch in LAUNCH_ROWS:
        time_ms = quant_timer(shape, launch, torch.bfloat16, torch.device(device), H100.sm_count,
                              bench=lambda fn: (fn(), 0.25)[-1])
        cands = candidates(shape, launch, torch.bfloat16, H100.sm_count)
        assert [time_ms(c) for c in cands] == [0.25] * len(cands)
        assert rec.take() == cands


# ------------------------------------------------------------------------------------------- the engine, env
@pytest.fixture
def gptq_dir(tmp_path, qwen_tokenizer_dir):
    """A tests/data/quant fixture next to the Qwen tokenizer files (LLM reads them from the model directory)."""
    import os
    import shutil

    def make(name):
        path = tmp_path / name
        shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "quant", name), path)
        for f in os.listdir(qwen_tokenizer_dir):
            shutil.copy(os.path.join(qwen_tokenizer_dir, f), path)
        return str(path)
    return make


@pytest.mark.parametrize("name", ["gptq-int4-g128-sym", "awq-int4-g128"])
def test_llm_plans_its_quantized_shapes(gptq_dir, tmp_path, name, device):
    """LLM hands the loaded model's quantized shapes to the plan; env's reading of the checkpoint (config only)
    names the same shapes. float32 on the interpreter: the heuristic, nothing timed, nothing passed on."""
    from qwen2_triton import LLM
    from qwen2_triton.runtime.quant_tuning import checkpoint_shapes

    path = gptq_dir(name)
    llm = LLM(path, kernels="triton", device=str(device), dtype="float32", progress=False,
              tuning_cache=str(tmp_path / "t.json"))
    shapes = {s for s, _ in llm.plan.quant}
    assert shapes == set(quant_shapes(llm.model.params)) == set(checkpoint_shapes(path)) and len(shapes) == 4
    assert all(r.source == "default" for r in llm.plan.quant.values()) and llm.ops.quant_cfgs == {}
    assert "quantized linear launches" in "\n".join(llm.plan.describe())


def test_env_names_the_quantized_launch_configs(gptq_dir, demo_gguf, capsys):
    from qwen2_triton.runtime.env_report import main

    assert main(["--model", gptq_dir("gptq-int4-g128-sym"), "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    qkv = quant_config(1, 1152, 896, 128, torch.bfloat16, 132)  # the fixture's qkv: hidden 896, 14 + 2 x 2 heads of 64
    assert f"quant_linear int4 g128 N=1152 K=896: decode {config_label(qkv)} [heuristic until tuned for this GPU; " \
           in out, out
    assert main(["--model", demo_gguf, "--arch", "sm_80"]) == 0
    out = capsys.readouterr().out
    assert "gguf_linear Q4_K g32 N=896 K=4864: decode " in out and "gguf_linear Q8_0 g32 N=128 K=896" in out, out


def test_env_reports_a_cached_choice(gptq_dir, tmp_path, capsys):
    """What an H100 start tuned (here: fake timers) is what env --arch sm_90 reports from the same cache file."""
    from qwen2_triton.runtime.env_report import main

    qkv = QuantShape("int4", 4, 128, 1152, 896)
    cache = TuningCache(tmp_path / "t.json")
    results, cands = plan_quant(H100, torch.bfloat16, {qkv: None}, tune_now=True, cache=cache,
                                timers=_fake_timers([qkv], {(qkv, "decode"): (1, 0.5)}))
    assert results[qkv, "decode"].config == cands[qkv, "decode"][1]
    assert main(["--model", gptq_dir("gptq-int4-g128-sym"), "--arch", "sm_90", "--tuning-cache",
                 str(tmp_path / "t.json")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "N=1152 K=896" in x)
    assert f"decode {config_label(cands[qkv, 'decode'][1])} [cached for this GPU in {tmp_path / 't.json'}" in line
    assert f"prefill {config_label(cands[qkv, 'prefill'][0])} [cached for this GPU" in line and "heuristic's" in line
