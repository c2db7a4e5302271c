"""The qwen2-triton command line, run as a user runs it (a subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from checkpoints import make_checkpoint


def cli(*args, input=None, timeout=300):
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    # bytes, not text mode: universal-newline translation would turn a generated "\r\n" into "\n"
    out = subprocess.run([sys.executable, "-m", "qwen2_triton.cli", *args], capture_output=True, timeout=timeout,
                         env=env, input=None if input is None else input.encode())
    out.stdout, out.stderr = out.stdout.decode("utf-8"), out.stderr.decode("utf-8")
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, qwen_tokenizer_dir):
    path = str(tmp_path_factory.mktemp("cli_ckpt"))
    make_checkpoint(path, "qwen2-0.5b", qwen_tokenizer_dir)
    return path


def test_help_names_every_command():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("generate", "chat", "kernels", "bench", "--model"):
        assert word in out.stdout


def test_generate_streams_the_same_text_as_the_api(ckpt):
    from qwen2_triton import LLM, SamplingParams

    out = cli("generate", "--model", ckpt, "--temperature", "0", "--max-tokens", "12", "Hello world")
    assert out.returncode == 0, out.stderr
    want = LLM(ckpt, progress=False, device="cpu").generate(
        "Hello world", SamplingParams(max_tokens=12, temperature=0))[0].text
    assert out.stdout == want + "\n"
    assert "KV cache" in out.stderr  # start-up report goes to stderr, the text alone to stdout


def test_chat_reads_turns_and_exits(ckpt):
    out = cli("chat", "--model", ckpt, "--temperature", "0", "--max-tokens", "5", input="hi there\n/reset\nagain\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") >= 3


def test_bad_model_path_is_a_clear_error(tmp_path):
    out = cli("generate", "--model", str(tmp_path / "nope"), "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_bad_sampling_value_is_a_clear_error(ckpt):
    out = cli("generate", "--model", ckpt, "--top-p", "1.5", "hi")
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr


def test_env_reports_device_and_choices():
    out = cli("env")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "triton" in out.stdout and "kernels=" in out.stdout and "dtype" in out.stdout


def test_env_for_an_assumed_gpu(ckpt):
    """Without a GPU, --arch shows what each capability would get and why."""
    h100, a10, t4 = cli("env", "--arch", "sm_90"), cli("env", "--arch", "sm_86"), cli("env", "--arch", "sm_75")
    assert h100.returncode == a10.returncode == t4.returncode == 0, h100.stderr + a10.stderr + t4.stderr
    assert "sm_90" in h100.stdout and "227 KB" in h100.stdout and "kernels=triton" in h100.stdout
    assert "Qwen2-7B" in h100.stdout and "prefill 64x64w8s2" in h100.stdout and "6 candidates" in h100.stdout
    assert "99 KB" in a10.stdout and "4 candidates" in a10.stdout  # fewer prefill tiles fit 99 KB at head_dim 128
    assert "kernels=torch" in t4.stdout and "below Triton's sm_80 floor" in t4.stdout and "float16" in t4.stdout
    one = cli("env", "--arch", "sm_90", "--model", ckpt)
    assert one.returncode == 0 and "Qwen2-7B" not in one.stdout and "decode 16x" in one.stdout
    bad = cli("env", "--tune")
    assert bad.returncode == 2 and "--tune needs a CUDA device" in bad.stderr


def test_chat_survives_a_history_longer_than_the_context(ckpt):
    out = cli("chat", "--model", ckpt, "--temperature", "0", "--max-model-len", "40", "--max-tokens", "4",
              input="word " * 30 + "\nshort\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "exceeds the model's context" in out.stderr and out.stdout.count("> ") == 3


def test_bench_dispatch():
    """`qwen2-triton bench` names both benchmarks; e2e runs (shrunken shapes) from the CLI."""
    out = cli("bench", "--help")
    assert out.returncode == 0 and "e2e" in out.stdout and "cpu-decode" in out.stdout
    e2e = cli("bench", "e2e", "--tiny", "--models", "qwen2-0.5b", "--decode-tokens", "4", "--prefill", "32",
              "--requests", "4", "--no-hf")
    assert e2e.returncode == 0, e2e.stderr
    assert "qwen2-0.5b" in e2e.stdout
