"""GPTQ and AWQ checkpoints against an independent reader: tests/data/quant/ holds tiny seed-shaped checkpoints packed
by GPTQModel and the float32 prompt log-probs HF transformers computed reading them through GPTQModel's torch
kernels (scripts/make_quant_fixtures.py; refs.json names the versions). Both our paths must agree with it:
the torch backend (dequantized at load) and the Triton weight-only kernels (interpreter on CPU)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2_triton import LLM, SamplingParams
from qwen2_triton.kernels.quant_linear import FusedQuantWeight, QuantWeight

DATA = os.path.join(os.path.dirname(__file__), "data", "quant")
with open(os.path.join(DATA, "refs.json")) as _f:
    REFS = json.load(_f)
IDS = REFS["prompt_ids"]
NAMES = list(REFS["fixtures"])
TOL = 2e-3  # prompt log-probs in float32, as tests/test_model_vs_hf.py asks of the dense model


@pytest.fixture(scope="module")
def checkpoint(module_tmp, qwen_tokenizer_dir):
    """A fixture copied next to the Qwen tokenizer files (LLM reads them from the model directory); ``edit``
    rewrites config.json's quantization_config (a function of it) and the tensors (a function of the dict)."""
    n = iter(range(10_000))

    def make(name, edit_config=None, edit_tensors=None):
        path = module_tmp(f"{name}-{next(n)}")
        shutil.copytree(os.path.join(DATA, name), path, dirs_exist_ok=True)
        for f in os.listdir(qwen_tokenizer_dir):
            shutil.copy(os.path.join(qwen_tokenizer_dir, f), path)
        if edit_config is not None:
            cfg_path = os.path.join(path, "config.json")
            with open(cfg_path) as f:
                raw = json.load(f)
            edit_config(raw)
            with open(cfg_path, "w") as f:
                json.dump(raw, f)
        if edit_tensors is not None:
            st = os.path.join(path, "model.safetensors")
            tensors = load_file(st)
            edit_tensors(tensors)
            save_file(tensors, st)
        return path

    return make


def prompt_logprobs(llm: LLM, max_tokens: int = 1):
    out = llm.generate(IDS, SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0,
                                           ignore_eos=True))[0]
    lp = torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], IDS[1:])], dtype=torch.float64)
    return lp, out.token_ids


def reference(name):
    ref = torch.tensor(REFS["fixtures"][name]["prompt_logprobs"], dtype=torch.float64)
    assert ref.std() > 0.3  # the random model is far from uniform, so a mis-read code or zero would show
    return ref


def torch_llm(path, **kw):
    return LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_torch_path_matches_independent_reader(checkpoint, name):
    llm = torch_llm(checkpoint(name))
    assert all(isinstance(p, torch.Tensor) for p in llm.model.params.values())  # dequantized at load
    ours, _ = prompt_logprobs(llm)
    torch.testing.assert_close(ours, reference(name), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernels_match_independent_reader(checkpoint, name):
    """Prefill (a 48-token prompt) then split-K decode steps through the weight-only kernels; the decoded tokens
    equal the torch path's."""
    path = checkpoint(name)
    tri = LLM(path, dtype="float32", device="cpu" if not torch.cuda.is_available() else None, kernels="triton",
              progress=False)
    P = tri.model.params
    qkv = P["model.layers.0.self_attn.qkv_proj.weight"]
    if name.endswith("descact"):  # q, k, v were given different act-orders: one launch per part
        assert isinstance(qkv, FusedQuantWeight) and all(p.perm is not None for p in qkv.parts)
    else:
        assert isinstance(qkv, QuantWeight) and qkv.perm is None
        assert (qkv.zeros is None) == REFS["fixtures"][name]["quantization_config"].get("sym", False)
    ours, tokens = prompt_logprobs(tri, max_tokens=3)
    torch.testing.assert_close(ours, reference(name), atol=TOL, rtol=0)
    assert tokens == prompt_logprobs(torch_llm(path), max_tokens=3)[1]


def test_quantization_none_dequantizes_for_triton(checkpoint):
    llm = LLM(checkpoint("gptq-int4-g128-sym"), dtype="float32", device="cpu", kernels="triton", progress=False,
              quantization="none")
    assert all(isinstance(p, torch.Tensor) for p in llm.model.params.values())


def test_quantization_setting_is_checked_before_loading():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM("/nonexistent", device="cpu", quantization="int4")


# ---------------------------------------------------------------------------------------- the oracle can fail
def _far(llm, name):
    return (prompt_logprobs(llm)[0] - reference(name)).abs().max() > 50 * TOL


def test_v1_zero_convention_matters(checkpoint):
    """Reading a format-"gptq" (v1: zero - 1 stored) checkpoint as gptq_v2 moves every zero by one."""
    name = "gptq-int4-g128-sym"
    assert _far(torch_llm(checkpoint(name, lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))),
                name)
    name = "gptq-int8-g128-v2"
    assert _far(torch_llm(checkpoint(name, lambda c: c["quantization_config"].update(checkpoint_format="gptq"))),
                name)


def test_awq_nibble_order_matters(checkpoint, monkeypatch):
    from qwen2_triton.model import quant_awq

    monkeypatch.setattr(quant_awq, "AWQ_ORDER", tuple(range(8)))
    assert _far(torch_llm(checkpoint("awq-int4-g128")), "awq-int4-g128")


def test_desc_act_g_idx_matters(checkpoint):
    """The act-order fixture read with natural groups (g_idx dropped, desc_act off)."""
    name = "gptq-int4-g128-descact"
    path = checkpoint(name, lambda c: c["quantization_config"].update(desc_act=False),
                      lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".g_idx")]])
    assert _far(torch_llm(path), name)


# ---------------------------------------------------------------------------------------------- bad input
Q = "model.layers.0.self_attn.q_proj"


def _set(**kw):
    return lambda c: c["quantization_config"].update(kw)


@pytest.mark.parametrize("name,edit_config,edit_tensors,match", [
    ("gptq-int4-g128-sym", _set(bits=3), None, "unsupported GPTQ bits 3"),
    ("gptq-int4-g128-sym", _set(checkpoint_format="marlin"), None, "format 'marlin'"),
    ("awq-int4-g128", _set(version="gemv"), None, "version 'gemv'.*supported: .*gemm"),
    ("gptq-int4-g128-sym", _set(quant_method="bitsandbytes"), None, "unsupported quant_method 'bitsandbytes'"),
    ("gptq-int4-g128-sym", _set(group_size=96), None, "group_size 96 does not divide in_features 896"),
    ("gptq-int4-g128-sym", None, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:-1]}),
     r"q_proj.scales is \(6, 896\).*expected \(7, 896\)"),
    ("gptq-int8-g128-v2", None, lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:, :-2].contiguous()}),
     r"q_proj.qzeros is \(3, 382\).*expected \(3, 384\)"),
    ("awq-int4-g128", None, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:-8]}),
     r"q_proj.qweight is \(888, 112\).*expected \(896, 112\)"),
    ("gptq-int4-g128-descact", None, lambda t: t.update({f"{Q}.g_idx": t[f"{Q}.g_idx"] + 1}),
     r"q_proj.g_idx has values in \[1, 3\], expected groups in \[0, 3\)"),
    ("gptq-int4-g128-descact", None, lambda t: t.pop(f"{Q}.g_idx"), "missing tensor .*q_proj.g_idx"),
    ("gptq-int4-g128-sym", lambda c: c.pop("quantization_config"), None,
     r"_proj.qweight' is GPTQ/AWQ-packed but config.json has no quantization_config"),
    ("gptq-int4-g128-sym", None, lambda t: [t.pop(k) for k in [k for k in t if "layers.1." in k and "_proj.q" in k]],
     "missing tensor model.layers.1.self_attn.q_proj.qweight"),
    ("gptq-int4-g128-sym", None, lambda t: [t.pop(k) for k in [k for k in t if "layers.1." in k and "bias" not in k
                                                                and "_proj." in k]],
     "quantization_config .* but the checkpoint has no packed tensors .* for 7 projection.*layers.1.mlp.down_proj"),
    ("gptq-int4-g128-sym", None,
     lambda t: t.update({f"{Q}.weight": torch.zeros(896, 896, dtype=torch.float16)}), "q_proj.weight' is unquantized"),
])
def test_bad_checkpoints_name_the_tensor(checkpoint, name, edit_config, edit_tensors, match):
    with pytest.raises(ValueError, match=match):
        torch_llm(checkpoint(name, edit_config, edit_tensors))


def test_truncated_file_is_named(checkpoint):
    path = checkpoint("gptq-int4-g128-sym")
    st = os.path.join(path, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    with pytest.raises(ValueError, match="model.safetensors"):
        torch_llm(path)


def test_env_names_the_quantization_and_bytes(checkpoint, capsys):
    from qwen2_triton.runtime.env_report import main

    assert main(["--model", checkpoint("gptq-int4-g128-descact"), "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("quantization:"))
    assert "GPTQ int4 group 128 asym desc_act (format gptq)" in line
    assert "weights 2.2 MB as stored, the packed projections 1.8 MB" in line and "W4A16" in line


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_projections_are_never_allocated_dense(checkpoint, monkeypatch, kernels):
    """The loader builds the model without the packed projections (model/loader.py ``defer``), so no dense copy of
    them exists at any point of the load (on a GPU: a peak of the whole dense model); either path puts them in."""
    from qwen2_triton.model import loader

    allocated = []

    class Recording(loader.Qwen2Model):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            allocated.append(set(self.params))

    monkeypatch.setattr(loader, "Qwen2Model", Recording)
    llm = LLM(checkpoint("gptq-int4-g128-sym"), dtype="float32", device="cpu", kernels=kernels, progress=False)
    (names,) = allocated
    projections = {n for n in llm.model.params if n.endswith("_proj.weight")}
    assert len(projections) == 4 * llm.model.cfg.num_hidden_layers and not projections & names
    assert all(isinstance(llm.model.params[n], torch.Tensor) == (kernels == "torch") for n in projections)
