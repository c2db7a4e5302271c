"""Bad input gets a clear error naming the problem, and the LLM stays usable afterwards."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", device="cpu", kernels="torch", progress=False, max_model_len=512)


def variant(ckpt, tmp_path, edit_config=None, edit_tensors=None):
    """A copy of the checkpoint with its config or tensors edited."""
    out = tmp_path / "variant"
    shutil.copytree(ckpt, out)
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def load(path, **kw):
    return LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, **kw)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist") as e:
        load(str(tmp_path / "does-not-exist"))
    assert "download" not in str(e.value)  # an absolute path is not a Hub id


def test_missing_path_that_reads_as_a_hub_id_gets_a_download_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./Qwen/Qwen2-0.5B-Instruct here
    with pytest.raises(FileNotFoundError) as e:
        load("Qwen/Qwen2-0.5B-Instruct")
    msg = str(e.value)
    assert msg.startswith("model path does not exist: Qwen/Qwen2-0.5B-Instruct") and "does not download" in msg
    assert "`hf download Qwen/Qwen2-0.5B-Instruct --local-dir ./Qwen2-0.5B-Instruct`" in msg
    assert "model='./Qwen2-0.5B-Instruct'" in msg


@pytest.mark.parametrize("path", ["./Qwen/Qwen2", "models/qwen2.gguf", "a/b/c", "~/Qwen/Qwen2", "Qwen2-0.5B"])
def test_missing_local_path_gets_no_hub_hint(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model path does not exist") as e:
        load(path)
    assert "download" not in str(e.value)


def test_config_without_architectures_loads(ckpt, tmp_path, llm):
    def drop(c):
        del c["architectures"]
        c["model_type"] = "qwen2"

    plain = load(variant(ckpt, tmp_path, edit_config=drop), max_model_len=512)
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert plain.generate("hello", p)[0].token_ids == llm.generate("hello", p)[0].token_ids


def test_directory_without_weights(tmp_path, ckpt):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(ckpt, "config.json"), d / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load(str(d))


def test_not_a_model_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        load(str(f))


def test_unsupported_architecture(ckpt, tmp_path):
    path = variant(ckpt, tmp_path, edit_config=lambda c: c.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        load(path)


@pytest.mark.parametrize("field,value,message", [
    ("num_key_value_heads", 3, "not divisible by num_key_value_heads 3"),
    ("num_attention_heads", 15, "hidden_size 112 is not divisible by num_attention_heads 15"),
])
def test_inconsistent_config(ckpt, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        load(variant(ckpt, tmp_path, edit_config=lambda c: c.update({field: value})))


def test_config_weight_shape_mismatch(ckpt, tmp_path):
    path = variant(ckpt, tmp_path, edit_config=lambda c: c.update(intermediate_size=140))
    with pytest.raises(ValueError, match=r"tensor .model.layers.0.mlp.\w+_proj.weight. has shape \(\d+, \d+\), the config implies"):
        load(path)


def test_missing_tensor(ckpt, tmp_path):
    path = variant(ckpt, tmp_path, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor.*layers\.1\.self_attn\.k_proj\.bias"):
        load(path)


def test_extra_tensor(ckpt, tmp_path):
    import torch

    path = variant(ckpt, tmp_path, edit_tensors=lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*mlp\.extra\.weight"):
        load(path)


def test_stray_lm_head_ignored_when_tied(ckpt, tmp_path, llm):
    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] * 0 + 1  # garbage: must not be used

    tied = load(variant(ckpt, tmp_path, edit_tensors=add_head), max_model_len=512)
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    assert tied.generate("hello", p)[0].token_ids == llm.generate("hello", p)[0].token_ids


def test_truncated_safetensors(ckpt, tmp_path):
    path = variant(ckpt, tmp_path)
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        load(path)


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = variant(ckpt, tmp_path)
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.seek(10)
        fh.write(b"\x00garbage{{{")
    with pytest.raises(ValueError, match="model.safetensors"):
        load(path)


@pytest.mark.parametrize("kw,message", [
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"device": "tpu"}, "device 'tpu'"),
    ({"kernels": "cuda"}, "kernels must be one of"),
    ({"generation_config": "vllm"}, "generation_config must be one of"),
])
def test_bad_llm_arguments(ckpt, kw, message):
    with pytest.raises(ValueError, match=message):
        LLM(ckpt, progress=False, **{"device": "cpu", "kernels": "torch", **kw})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(ckpt):
    with pytest.raises(ValueError, match="no CUDA device"):
        LLM(ckpt, device="cuda", progress=False)


@pytest.mark.parametrize("params,message", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(logprobs=200_000), "logprobs"),
    (dict(prompt_logprobs=200_000), "prompt_logprobs"),
])
def test_bad_sampling_params(llm, params, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        llm.generate("hello", SamplingParams(**params))
    assert_still_usable(llm)


@pytest.mark.parametrize("prompt,message", [
    ("", "prompt 0 is empty"),
    ([], "no prompts given"),
    ([[5, 151936]], r"token id\(s\) \[151936\] outside the vocabulary \[0, 151936\)"),
    ([[5, -1]], r"token id\(s\) \[-1\] outside the vocabulary"),
    ([3.5], "must be a string or a list of int token ids"),
    ([[]], "prompt 0 is empty"),
])
def test_bad_prompts(llm, prompt, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, SamplingParams(max_tokens=2))
    assert_still_usable(llm)


def test_prompt_plus_max_tokens_beyond_context(llm):
    with pytest.raises(ValueError, match=r"\+ max_tokens 510 = 51[0-9] exceeds the model's context of 512"):
        llm.generate("a b c d e f g", SamplingParams(max_tokens=510))
    assert_still_usable(llm)


def test_one_bad_request_in_a_batch_rejects_the_call_cleanly(llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        llm.generate(["fine", "", "also fine"], SamplingParams(max_tokens=2))
    assert not llm.scheduler.has_work()
    assert_still_usable(llm)


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_malformed_chat_messages(llm):
    with pytest.raises(ValueError):
        llm.chat("just a string")
    with pytest.raises(ValueError):
        llm.chat([{"content": "no role"}])
    assert_still_usable(llm)


def assert_still_usable(llm):
    out = llm.generate("still", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    assert not llm.scheduler.has_work() and len(llm.blocks.free) == llm.blocks.num_blocks - 1


def test_stream_rejects_bad_input_before_iteration(llm):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.stream("", SamplingParams(max_tokens=2))  # raised by the call itself, not by the first next()
    assert_still_usable(llm)


def test_max_model_len_must_be_positive(ckpt):
    with pytest.raises(ValueError, match="max_model_len must be an integer >= 2"):
        load(ckpt, max_model_len=-5)
