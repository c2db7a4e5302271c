"""Length-adaptive YaRN (EngineConfig.rope_scaling, runtime/rope_mode.py) against HF transformers.

A tiny YaRN checkpoint with original_max_position_embeddings 256 and factor 4 (context 1024). With "auto", a request
whose prompt + max_tokens fits 256 tokens must match HF on the same weights with rope_scaling removed, a longer
one HF with YaRN, both in one batch (one step, one cos/sin buffer, per-token rows); "static" matches HF with YaRN
for both; "none" refuses the long one. The two HF references differ by far more than the tolerance, so a request
run with the other table, a dropped attention factor or a wrong table offset fails (the last tests show it).
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import hf_config, hf_prompt_logprobs, make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.kernels.rotary import build_cos_sin_cache
from qwen2_triton.model.config import Qwen2Config
from qwen2_triton.runtime.decode_graphs import DecodeGraphs
from qwen2_triton.runtime.engine_config import EngineConfig
from qwen2_triton.runtime.input_processor import REST_OF_CONTEXT, InputProcessor
from qwen2_triton.runtime.rope_mode import ROPE_SCALING_CHOICES, RopePolicy

ORIGINAL = 256  # original_max_position_embeddings of the test checkpoint; YaRN factor 4 -> context 1024
# float32 prompt log-probs against HF (observed: torch <= 2.5e-6, Triton interpreter <= 1.4e-6); the plain and
# YaRN references differ by more than 1000 x TOL on these prompts (checked below), so a wrong table cannot pass.
TOL = 5e-5


@pytest.fixture(scope="module")
def ckpt(module_tmp, qwen_tokenizer_dir):
    """(path, HF model with YaRN, HF model with the same weights and rope_scaling removed)."""
    from transformers import Qwen2ForCausalLM

    path = module_tmp("yarn256")
    hf_yarn = make_checkpoint(path, "qwen2-0.5b", qwen_tokenizer_dir, yarn=True, yarn_original=ORIGINAL, rng_seed=5)
    hf_plain = Qwen2ForCausalLM(hf_config("qwen2-0.5b")).eval()
    hf_plain.load_state_dict(hf_yarn.state_dict())
    return path, hf_yarn, hf_plain


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150000, (n,), generator=g).tolist()


SHORT, LONG = ids_of(100, 1), ids_of(300, 2)  # 100 + 1 <= 256: plain; 300 + 1 > 256: YaRN
SHORT_PROMPT_LONG_BUDGET = ids_of(250, 3)  # 250 + max_tokens 8 > 256: YaRN from its first token


def ours(out) -> torch.Tensor:
    ids = out.prompt_token_ids
    return torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


def record_rope_rows(llm: LLM) -> list[torch.Tensor]:
    """Every step's rope rows, as the model receives them."""
    seen, forward = [], llm.model.forward

    def spy(*args, rope_rows=None, **kw):
        seen.append(rope_rows.clone())
        return forward(*args, rope_rows=rope_rows, **kw)

    llm.model.forward = spy
    return seen


def engine(path, **kw) -> LLM:
    return LLM(path, dtype="float32", device="cpu", progress=False, **{"kernels": "torch", **kw})


# ------------------------------------------------------------------------------------------------- rules
def test_policy_rules():
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 1e6}
    yarn = Qwen2Config.from_dict({**base, "max_position_embeddings": 256, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}})
    auto, static, none = (RopePolicy.of(s, yarn) for s in ("auto", "static", "none"))
    assert [auto.mode_for(n) for n in (1, 256, 257, 1024)] == ["plain", "plain", "yarn", "yarn"]
    assert {static.mode_for(n) for n in (1, 1024)} == {"yarn"} and {none.mode_for(n) for n in (1, 1024)} == {"plain"}
    assert (auto.max_model_len(1024), static.max_model_len(1024), none.max_model_len(1024)) == (1024, 1024, 256)
    plain = Qwen2Config.from_dict({**base, "max_position_embeddings": 512})
    for s in ROPE_SCALING_CHOICES:  # a checkpoint without rope_scaling: plain RoPE, whatever the setting
        p = RopePolicy.of(s, plain)
        assert p.mode_for(1) == p.mode_for(512) == "plain" and p.max_model_len(512) == 512
        assert "the checkpoint has none" in p.describe()


@pytest.mark.parametrize("bad", ["yarn", "dynamic", "AUTO", "", None, True, 1])
def test_bad_rope_scaling_values_are_refused(bad):
    with pytest.raises(ValueError, match=r"rope_scaling must be one of \('auto', 'static', 'none'\), got "):
        EngineConfig(rope_scaling=bad)


def test_cli_flag(monkeypatch, capsys):
    from qwen2_triton import cli as cli_mod

    assert cli_mod.ROPE_SCALING_CHOICES == ROPE_SCALING_CHOICES
    a = cli_mod.build_parser().parse_args(["generate", "--rope-scaling", "static", "hi"])
    assert cli_mod._engine_kwargs(a)["rope_scaling"] == "static"
    assert cli_mod._engine_kwargs(cli_mod.build_parser().parse_args(["generate", "hi"]))["rope_scaling"] == "auto"
    with pytest.raises(SystemExit) as e:
        cli_mod.build_parser().parse_args(["generate", "--rope-scaling", "dynamic", "hi"])
    assert e.value.code == 2 and "argument --rope-scaling: invalid choice: 'dynamic'" in capsys.readouterr().err


def test_input_processor_decides_at_admission():
    """prompt + max_tokens decides; n completions share the mode; an unset max_tokens meaning "the rest of the
    context" keeps a prompt that fits the original context on plain RoPE under "auto"."""
    def proc(setting):
        return InputProcessor(None, 1000, RopePolicy(setting, "yarn", 256).max_model_len(1024), 4096, {},
                              default_max_tokens=REST_OF_CONTEXT, rope=RopePolicy(setting, "yarn", 256))

    def run(p, n_prompt, **kw):
        return p.process([7] * n_prompt, SamplingParams(**kw), "r").engine_requests

    auto = proc("auto")
    assert [r.rope_mode for r in run(auto, 200, max_tokens=56, n=2)] == ["plain", "plain"]
    assert [r.rope_mode for r in run(auto, 200, max_tokens=57, n=2)] == ["yarn", "yarn"]
    (r,) = run(auto, 200)
    assert (r.rope_mode, r.params.max_tokens) == ("plain", 56)
    (r,) = run(auto, 300)
    assert (r.rope_mode, r.params.max_tokens) == ("yarn", 724)
    (r,) = run(proc("static"), 200)
    assert (r.rope_mode, r.params.max_tokens) == ("yarn", 824)
    (r,) = run(proc("none"), 200)
    assert (r.rope_mode, r.params.max_tokens) == ("plain", 56)
    with pytest.raises(ValueError, match=r"prompt 0: 300 prompt tokens \+ max_tokens 1 = 301 exceeds the model's "
                                         r"context of 256 tokens \(rope_scaling='none' keeps the original context "
                                         r"of 256 tokens; 'auto' or 'static' extends it with yarn\)"):
        run(proc("none"), 300, max_tokens=1)


# ------------------------------------------------------------------------------------------- against HF
def test_auto_mixes_plain_and_yarn_in_one_batch_torch(ckpt):
    path, hf_yarn, hf_plain = ckpt
    llm = engine(path, max_num_batched_tokens=512)
    assert llm.max_model_len == 4 * ORIGINAL and llm.model.rope_offsets == {"plain": 0, "yarn": ORIGINAL}
    assert f"rope_scaling=auto: plain RoPE when prompt + max_tokens <= {ORIGINAL}" in llm.core.describe()[-1]
    rows = record_rope_rows(llm)
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)
    outs = llm.generate([SHORT, LONG, SHORT_PROMPT_LONG_BUDGET], [p, p, SamplingParams(
        max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True)])
    assert [o.rope_mode for o in outs] == ["plain", "yarn", "yarn"]
    assert rows[0].min() < ORIGINAL <= rows[0].max()  # the first step packed both tables' tokens
    refs = [hf_plain, hf_yarn, hf_yarn]
    for out, hf, other in zip(outs, refs, [hf_yarn, hf_plain, hf_plain]):
        want = hf_prompt_logprobs(hf, out.prompt_token_ids)
        assert (want - hf_prompt_logprobs(other, out.prompt_token_ids)).abs().max() > 1000 * TOL  # they differ
        torch.testing.assert_close(ours(out), want, atol=TOL, rtol=0)
    assert len(outs[2].token_ids) == 8  # it decoded past 256 tokens on the table it started with


def test_static_is_yarn_for_every_request(ckpt):
    path, hf_yarn, _ = ckpt
    llm = engine(path, rope_scaling="static")
    p = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([SHORT, LONG], p)
    assert [o.rope_mode for o in outs] == ["yarn", "yarn"]
    for out in outs:
        torch.testing.assert_close(ours(out), hf_prompt_logprobs(hf_yarn, out.prompt_token_ids), atol=TOL, rtol=0)


def test_none_is_plain_and_refuses_longer_requests(ckpt):
    path, _, hf_plain = ckpt
    llm = engine(path, rope_scaling="none")
    assert llm.max_model_len == ORIGINAL and "context 256 tokens; rope_scaling=none" in llm.core.describe()[-1]
    with pytest.raises(ValueError, match=r"300 prompt tokens \+ max_tokens 1 = 301 exceeds the model's context of "
                                         r"256 tokens \(rope_scaling='none'"):
        llm.generate(LONG, SamplingParams(max_tokens=1))
    out = llm.generate(SHORT, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert out.rope_mode == "plain"
    torch.testing.assert_close(ours(out), hf_prompt_logprobs(hf_plain, SHORT), atol=TOL, rtol=0)
    assert llm.stats()["kv_blocks_used"] == 0  # the refused request left nothing behind


def test_mixed_decode_on_the_static_graph_buffers_and_through_preemption(ckpt):
    """Greedy tokens of a plain and a YaRN request decoding side by side on the CUDA-graph input buffers (run
    eagerly on CPU), in a pool so small that one is preempted and recomputed: each equals HF's greedy tokens on
    its own table, so the rope rows travel in the static buffer and a recomputed request keeps its mode."""
    path, hf_yarn, hf_plain = ckpt
    llm = engine(path, max_num_seqs=4, kv_cache_tokens=448, block_size=16)
    r = llm.runner
    r.decode_graphs = DecodeGraphs(llm.model, r.kv_caches, 4, llm.max_model_len, 16, use_graphs=False, tables=r.tables)
    rows = record_rope_rows(llm)
    prompts = [SHORT, LONG]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert [o.rope_mode for o in outs] == ["plain", "yarn"]
    assert llm.stats()["preemptions"] > 0 and r.decode_graphs.eager_runs > 5
    assert any(len(x) == 2 and x.min() < ORIGINAL <= x.max() for x in rows)  # a mixed decode step
    for ids, out, hf in zip(prompts, outs, (hf_plain, hf_yarn)):
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == want


def test_auto_mixes_plain_and_yarn_in_one_batch_triton(ckpt):
    """The same through the Triton kernels (the interpreter without a GPU; kept small): one prefill step with
    both modes, then mixed decode steps."""
    path, hf_yarn, hf_plain = ckpt
    llm = LLM(path, dtype="float32", device="cpu" if not torch.cuda.is_available() else None, kernels="triton",
              progress=False, max_num_batched_tokens=512)
    assert llm.ops.name == "triton"
    short, long = SHORT[:40], LONG[:270]
    rows = record_rope_rows(llm)
    outs = llm.generate([short, long], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0,
                                                      ignore_eos=True))
    assert [o.rope_mode for o in outs] == ["plain", "yarn"]
    assert rows[0].min() < ORIGINAL <= rows[0].max()
    for ids, out, hf in zip((short, long), outs, (hf_plain, hf_yarn)):
        torch.testing.assert_close(ours(out), hf_prompt_logprobs(hf, ids), atol=TOL, rtol=0)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == want


def hf_token_logprobs(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    return hf_prompt_logprobs(hf, prompt + tokens)[len(prompt) - 1:]


def test_prefix_cache_never_shares_blocks_across_rope_modes(ckpt):
    """Keys rotated with one table are wrong under the other: the same prompt run plain, then as a YaRN request
    (a longer max_tokens), must not reuse the plain request's cached blocks, while a second plain run does."""
    path, hf_yarn, hf_plain = ckpt
    llm = engine(path, enable_prefix_caching=True)
    prompt = LONG[:240]

    def run(max_tokens, hf):
        before = llm.stats()["prefix_cache_hits"]
        out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0,
                                                  ignore_eos=True))[0]
        got = torch.tensor([d[t] for d, t in zip(out.logprobs, out.token_ids)], dtype=torch.float64)
        torch.testing.assert_close(got, hf_token_logprobs(hf, prompt, out.token_ids), atol=TOL, rtol=0)
        return out.rope_mode, llm.stats()["prefix_cache_hits"] - before

    assert run(8, hf_plain) == ("plain", 0)  # 248 <= 256
    assert run(20, hf_yarn) == ("yarn", 0)  # 260 > 256: the plain blocks of the same tokens are not reused
    assert run(4, hf_plain) == ("plain", 239 // 16 * 16)  # ... a plain one reuses them (the last token is computed)


# ------------------------------------------------------------------------------ the checks can fail
def test_dropped_attention_factor_is_caught(ckpt):
    path, hf_yarn, _ = ckpt
    llm = engine(path)
    m = llm.model
    inv, _ = m.cfg.rope.inv_freq_and_attention_factor(m.cfg.head_dim)
    m.cos_sin[m.rope_offsets["yarn"]:] = build_cos_sin_cache(inv, m.rope_lengths["yarn"], 1.0)  # factor dropped
    out = llm.generate(LONG, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert (ours(out) - hf_prompt_logprobs(hf_yarn, LONG)).abs().max() > 100 * TOL


def test_wrong_table_offset_is_caught(ckpt):
    path, hf_yarn, hf_plain = ckpt
    llm = engine(path)
    llm.model.rope_offsets["yarn"] = 0  # YaRN requests read the plain rows
    out = llm.generate(LONG, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert (ours(out) - hf_prompt_logprobs(hf_yarn, LONG)).abs().max() > 100 * TOL
