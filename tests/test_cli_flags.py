"""The CLI's flags: checked before the model loads, passed to the engine as the library's settings, and library
errors read back in flag names."""
from __future__ import annotations

import pytest

from cli_fakes import FakeLLM, cli
from qwen2_triton import cli as cli_mod


@pytest.fixture
def no_load(monkeypatch):
    def fail(a):
        raise AssertionError("the model was loaded for a command line that cannot run")

    monkeypatch.setattr(cli_mod, "_llm", fail)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flags,message", [
    (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--temperature", "-1"], "--temperature -1.0:"),
    (["--max-tokens", "0"], "--max-tokens 0: must be an integer >= 1"),
    (["--top-k", "0"], "--top-k 0: must be -1 (off) or an integer >= 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty 0.0:"),
    (["--max-tokens", "64", "--max-model-len", "64"], "--max-tokens 64 leaves no room for a prompt"),
])
def test_bad_sampling_flag_fails_before_the_model_loads(no_load, capsys, command, flags, message):
    status = cli_mod.main([command, *flags] + (["hi"] if command == "generate" else []))
    err = capsys.readouterr().err
    assert status == 2 and f"qwen2-triton: error: {message}" in err and "SamplingParams" not in err


@pytest.mark.parametrize("flags,message", [
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--device", "tpu"], "argument --device: expected cuda, cuda:N or cpu, got 'tpu'"),
    (["--kernels", "cuda"], "argument --kernels: invalid choice: 'cuda'"),
    (["--max-model-len", "1"], "argument --max-model-len: expected an integer >= 2"),
    (["--max-model-len", "lots"], "argument --max-model-len: expected an integer >= 2"),
    (["--quantization", "int4"], "argument --quantization: invalid choice: 'int4'"),
    (["--async-output", "yes"], "argument --async-output: invalid choice: 'yes'"),
])
def test_bad_model_flag_fails_before_the_model_loads(no_load, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli_mod.main(["chat", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_flag_aliases_and_choices_match_the_library(monkeypatch):
    from qwen2_triton.runtime.kernel_plan import DTYPES, KERNEL_CHOICES

    assert cli_mod.KERNEL_CHOICES == KERNEL_CHOICES
    assert set(cli_mod.DTYPE_CHOICES[1:]) | set(cli_mod.DTYPE_ALIASES) == set(DTYPES)
    assert all(DTYPES[alias] == DTYPES[name] for alias, name in cli_mod.DTYPE_ALIASES.items())
    seen = {}
    monkeypatch.setattr(cli_mod, "_llm", lambda a: seen.update(dtype=a.dtype, device=a.device) or FakeLLM(["x"]))
    assert cli_mod.main(["generate", "--dtype", "bf16", "--device", "cuda:1", "hi"]) == 0
    assert seen == {"dtype": "bfloat16", "device": "cuda:1"}


@pytest.mark.parametrize("flags,want", [([], "auto"), (["--quantization", "none"], "none")])
def test_quantization_flag_reaches_the_engine_config(monkeypatch, flags, want):
    """Through the CLI's own _llm: LLM(...) receives the setting, and EngineConfig (which LLM builds) holds it."""
    from qwen2_triton.model.quantization import QUANTIZATION_CHOICES
    from qwen2_triton.runtime.engine_config import EngineConfig

    assert cli_mod.QUANTIZATION_CHOICES == QUANTIZATION_CHOICES
    seen = {}
    monkeypatch.setattr("qwen2_triton.LLM", lambda **kw: seen.update(cfg=EngineConfig(**kw)) or FakeLLM(["x"]))
    assert cli_mod.main(["generate", *flags, "hi"]) == 0
    assert seen["cfg"].quantization == want


@pytest.mark.parametrize("library,cli_text", [
    ("device='cuda' was asked for but no CUDA device is available; use device='cpu'",
     "--device cuda was asked for but no CUDA device is available; use --device cpu"),
    ("max_model_len must be an integer >= 2, got -5", "--max-model-len must be an integer >= 2, got -5"),
    ("SamplingParams.top_p=2: must be in (0, 1]", "--top-p 2: must be in (0, 1]"),
    ("prompt 0: 30 prompt tokens + max_tokens 4 = 34 exceeds the model's context of 32 tokens",
     "prompt 0: 30 prompt tokens + --max-tokens 4 = 34 exceeds the model's context of 32 tokens"),
    ("dtype bfloat16 needs sm_80 or newer; T4 is sm_75: use dtype='float16'",
     "dtype bfloat16 needs sm_80 or newer; T4 is sm_75: use --dtype float16"),
    ("SamplingParams.logprobs=-1: must be None or an integer >= 0",  # no such flag: left as it is
     "SamplingParams.logprobs=-1: must be None or an integer >= 0"),
    ("the seed and the device of this temperature", "the seed and the device of this temperature"),  # prose
])
def test_library_errors_read_in_flag_names(library, cli_text):
    assert cli_mod.flag_names(library) == cli_text


def test_library_error_at_load_names_the_flag(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_mod.main(["generate", "--device", "cuda", "hi"]) == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_hub_id_gets_a_download_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = cli("generate", "--model", "Qwen/Qwen2-0.5B-Instruct", "--device", "cpu", "hi")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "does not download" in out.stderr
    assert "hf download Qwen/Qwen2-0.5B-Instruct --local-dir ./Qwen2-0.5B-Instruct" in out.stderr
    assert "--model ./Qwen2-0.5B-Instruct" in out.stderr  # in CLI terms (the library says model='...')
