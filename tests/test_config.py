"""config.json parsing: both rope layouts, YaRN context, sliding window, validation."""
from __future__ import annotations

import math

import pytest
import torch

from qwen2_triton.model.config import Qwen2Config

BASE = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def test_release_config_defaults():
    cfg = Qwen2Config.from_dict({**BASE, "rope_theta": 1e6, "sliding_window": 131072, "use_sliding_window": False})
    assert cfg.head_dim == 64 and cfg.rope.type == "default" and cfg.rope.theta == 1e6
    assert cfg.max_model_len == 32768 and cfg.tie_word_embeddings  # sliding_window ignored: the flag is off


def test_enabled_sliding_window_is_refused_not_silently_ignored():
    with pytest.raises(ValueError, match="use_sliding_window=true is not supported"):
        Qwen2Config.from_dict({**BASE, "sliding_window": 4096, "use_sliding_window": True})


@pytest.mark.parametrize("layout", ["legacy-type", "legacy-rope_type", "rope_parameters"])
def test_yarn_in_every_layout(layout):
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768}
    raw = {
        "legacy-type": {**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", **yarn}},
        "legacy-rope_type": {**BASE, "rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", **yarn}},
        "rope_parameters": {**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, **yarn}},
    }[layout]
    cfg = Qwen2Config.from_dict(raw)
    assert cfg.rope.type == "yarn" and cfg.rope.theta == 1e6 and cfg.rope.factor == 4.0
    assert cfg.max_model_len == 4 * 32768  # usable context: factor x original
    inv, af = cfg.rope.inv_freq_and_attention_factor(cfg.head_dim)
    assert af == pytest.approx(0.1 * math.log(4.0) + 1)
    assert inv.shape == (32,)


def test_yarn_matches_transformers_and_explicit_attention_factor_wins():
    from transformers import Qwen2Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0, "original_max_position_embeddings": 4096,
            "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.7}
    hf = HFConfig(**{k: v for k, v in BASE.items() if k != "architectures"}, rope_parameters=rope)
    hf_inv, hf_af = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv, af = Qwen2Config.from_dict({**BASE, "rope_parameters": rope}).rope.inv_freq_and_attention_factor(64)
    assert af == hf_af == 1.7
    torch.testing.assert_close(inv, hf_inv, rtol=0, atol=0)


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
    ({"architectures": ["Qwen2ForSequenceClassification"], "model_type": "qwen2"}, "unsupported architecture"),
    ({"num_attention_heads": 15}, "not divisible by num_attention_heads"),
    ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope scaling type 'dynamic'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "factor >= 1"),
])
def test_invalid_configs(edit, message):
    with pytest.raises(ValueError, match=message):
        Qwen2Config.from_dict({**BASE, **edit})


def test_missing_field_is_named():
    raw = dict(BASE)
    del raw["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        Qwen2Config.from_dict(raw)


def test_model_type_qwen2_stands_in_for_missing_architectures():
    """Recent transformers can write a config.json without `architectures`; model_type then names the family."""
    raw = {k: v for k, v in BASE.items() if k != "architectures"}
    cfg = Qwen2Config.from_dict({**raw, "model_type": "qwen2", "rope_theta": 1e6})
    assert cfg == Qwen2Config.from_dict({**BASE, "rope_theta": 1e6})


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", None])
def test_without_architectures_other_model_types_are_refused(model_type):
    raw = {k: v for k, v in BASE.items() if k != "architectures"}
    with pytest.raises(ValueError, match=rf"unsupported model_type {model_type!r} \(and no 'architectures' field\); "
                                         r"qwen2-triton runs Qwen2ForCausalLM \(model_type 'qwen2'\)"):
        Qwen2Config.from_dict({**raw, "model_type": model_type} if model_type else raw)
