"""The qwen2-triton command line: run as a user runs it (a subprocess), and in-process with a fake LLM and
scripted input where a Ctrl-C must land at an exact point."""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import sys

import pytest

from checkpoints import checkpoint_fixture
from cli_fakes import CTRL_C_WHILE_PRINTING, FakeLLM, cli, run_main
from qwen2_triton import cli as cli_mod


ckpt = checkpoint_fixture()


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
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: --top-p 1.5: must be in (0, 1]" in out.stderr  # the flag, not SamplingParams.top_p
    assert "KV cache" not in out.stderr  # refused before the model loaded


def test_env_reports_device_and_choices():
    out = cli("env")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "triton" in out.stdout and "kernels=" in out.stdout and "dtype" in out.stdout


def test_env_for_an_assumed_gpu(ckpt):
    """Without a GPU, --arch shows what each capability would get and why."""
    h100, a10, t4 = cli("env", "--arch", "sm_90"), cli("env", "--arch", "sm_86"), cli("env", "--arch", "sm_75")
    assert h100.returncode == a10.returncode == t4.returncode == 0, h100.stderr + a10.stderr + t4.stderr
    assert "sm_90" in h100.stdout and "227 KB" in h100.stdout and "kernels=triton" in h100.stdout
    # sm_90, head_dim 128: 128-row prefill tiles, so both warpgroups of 8 warps do distinct rows (issue 9)
    assert "Qwen2-7B" in h100.stdout and "prefill 128x64w8s3" in h100.stdout and "5 candidates" in h100.stdout
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


# ------------------------------------------------------------------------------------------------------------
# In-process: cli.main with a fake LLM (cli._llm monkeypatched) and scripted input(), so Ctrl-C can be raised
# exactly where a person would press it.

def history(prompt: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in json.loads(prompt)]


def test_chat_ctrl_c_during_a_reply_stops_it_and_keeps_the_session(monkeypatch, capsys):
    fake = FakeLLM(["Hel", "lo", CTRL_C_WHILE_PRINTING, " never shown"], ["fine"])
    status, out, err, live = run_main(monkeypatch, capsys, fake, ["chat"], ["hi", "again", EOFError])
    assert status == 0
    assert live == [0, 0, 0]  # the interrupted stream was closed (its request aborted) before the next prompt
    assert "Hello\n> " in out and "never shown" not in out  # the reply's line ended; the prompt has its own
    assert out.endswith("fine\n> \n")  # Ctrl-D: the shell's prompt starts on a fresh line too
    assert "[reply stopped; Ctrl-C at the prompt quits]" in err
    # the partial reply stays in the history, as the user saw it
    assert history(fake.prompts[1]) == [("user", "hi"), ("assistant", "Hello"), ("user", "again")]


def test_chat_ctrl_c_before_any_text_drops_the_turn(monkeypatch, capsys):
    fake = FakeLLM([KeyboardInterrupt], ["fine"])  # Ctrl-C while the model runs its first step
    status, out, err, live = run_main(monkeypatch, capsys, fake, ["chat"], ["hi", "again", "/exit"])
    assert status == 0 and live == [0, 0, 0]
    assert "> \n> " in out and "reply stopped" in err
    assert history(fake.prompts[1]) == [("user", "again")]


def test_chat_ctrl_c_at_the_prompt_exits_on_a_new_line(monkeypatch, capsys):
    fake = FakeLLM(["fine"])
    status, out, err, _ = run_main(monkeypatch, capsys, fake, ["chat"], ["hi", KeyboardInterrupt])
    assert status == 130 and out.endswith("fine\n> \n") and "Traceback" not in err


@pytest.mark.parametrize("argv,room,defaults,note", [
    (["--max-tokens", "2"], 1000, None, "[reply cut off at 2 tokens: --max-tokens]"),
    ([], 1000, {"max_tokens": 2}, "[reply cut off at 2 tokens: the checkpoint's max_new_tokens; --max-tokens"),
    ([], 3, None, "[reply cut off at 2 tokens: the end of the context (--max-model-len)]"),  # room 3 - 1 token
])
def test_chat_says_when_a_reply_is_cut_off(monkeypatch, capsys, argv, room, defaults, note):
    fake = FakeLLM(["a", "b", "c"], ["done"], room=room, defaults=defaults)
    status, out, err, _ = run_main(monkeypatch, capsys, fake, ["chat", *argv], ["hi", "x", "/exit"])
    assert status == 0 and fake.params[0].max_tokens == 2
    assert "> ab\n> " in out and "abc" not in out
    assert err.count("cut off") == 1 and note in err  # the second reply ended by itself: no note


def test_chat_without_cut_off_has_no_note(monkeypatch, capsys):
    fake = FakeLLM(["a", "b"])
    _, out, err, _ = run_main(monkeypatch, capsys, fake, ["chat", "--max-tokens", "2"], ["hi", "/exit"])
    assert "ab\n" in out and "cut off" not in err  # 2 tokens, the second one the model's own stop


def test_generate_ctrl_c_ends_the_line_and_aborts(monkeypatch, capsys):
    fake = FakeLLM(["par", "tial", CTRL_C_WHILE_PRINTING, "x"])
    status, out, err, _ = run_main(monkeypatch, capsys, fake, ["generate", "hi"])
    assert status == 130 and out == "partial\n" and fake.live == 0


def test_generate_names_the_limit_that_cut_it_off(monkeypatch, capsys):
    fake = FakeLLM(["x"] * 300)
    status, out, err, _ = run_main(monkeypatch, capsys, fake, ["generate", "hi"])
    assert status == 0 and out == "x" * 256 + "\n"
    assert "[cut off at 256 tokens: the default of 256; --max-tokens sets another]" in err


class _Trap(io.StringIO):
    """stdout that raises KeyboardInterrupt at the n-th non-empty write after arm(n): Ctrl-C mid-reply."""
    countdown = None

    def write(self, s):
        if s and self.countdown is not None:
            self.countdown -= 1
            if self.countdown == 0:
                self.countdown = None
                raise KeyboardInterrupt
        return super().write(s)


def test_chat_ctrl_c_frees_the_real_engines_kv_blocks(monkeypatch, ckpt):
    """With the real engine: a reply stopped by Ctrl-C leaves no request running and every KV block free, and the
    next turn works."""
    from qwen2_triton import LLM

    llm = LLM(ckpt, dtype="float32", device="cpu", kernels="torch", progress=False, max_model_len=512)
    stdout, seen = _Trap(), []

    def scripted_input(prompt=""):
        seen.append((llm.scheduler.has_work(), len(llm.blocks.free) == llm.blocks.num_blocks - 1))
        if len(seen) == 1:
            stdout.countdown = 3  # Ctrl-C on the third piece of the first reply
        return ["hello there", "and again", "/exit"][len(seen) - 1]

    monkeypatch.setattr(cli_mod, "_llm", lambda a: llm)
    monkeypatch.setattr("builtins.input", scripted_input)
    monkeypatch.setattr(sys, "stdout", stdout)
    status = cli_mod.main(["chat", "--temperature", "0", "--max-tokens", "40"])
    assert status == 0 and stdout.countdown is None  # the trap fired
    assert seen == [(False, True)] * 3  # before each prompt: nothing running, every block free


# ------------------------------------------------------------------------------------------------------------
# --version and env --help

def test_version_comes_from_the_package_metadata():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout == f"qwen2-triton {importlib.metadata.version('qwen2-triton')}\n"


def test_version_falls_back_to_setup_py(monkeypatch):
    import ast

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cli_mod.__file__))), "setup.py")
    call = next(n for n in ast.walk(ast.parse(open(setup_py).read()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    want = next(k.value.value for k in call.keywords if k.arg == "version")
    assert cli_mod.version() == want


def test_env_help_says_things_once():
    out = cli("env", "--help")
    assert out.returncode == 0
    assert out.stdout.count("the kernel choices made for it and why") == 1
    assert out.stdout.count("qwen2-triton env --arch sm_86") == 1 and "``" not in out.stdout
