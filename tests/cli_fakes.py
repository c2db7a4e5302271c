"""Helpers of the CLI tests: the CLI run as a user runs it (a subprocess), and in-process with a fake LLM and
scripted input, so a Ctrl-C can be raised exactly where a person would press it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from qwen2_triton import cli as cli_mod


def cli(*args, input=None, timeout=300):
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    # bytes, not text mode: universal-newline translation would turn a generated "\r\n" into "\n"
    out = subprocess.run([sys.executable, "-m", "qwen2_triton.cli", *args], capture_output=True, timeout=timeout,
                         env=env, input=None if input is None else input.encode())
    out.stdout, out.stderr = out.stdout.decode("utf-8"), out.stderr.decode("utf-8")
    return out


CTRL_C_WHILE_PRINTING = object()  # a delta whose text raises KeyboardInterrupt: Ctrl-C lands in the CLI's print


class _CtrlCDelta:
    token_ids, finish_reason = [0], None

    @property
    def text(self):
        raise KeyboardInterrupt


class FakeLLM:
    """The part of LLM the CLI uses: stream(), tokenizer, room_after(), generation_defaults. Each stream plays the
    next script: strings (one token each; the last one finishes with "stop", an earlier one at max_tokens with
    "length"),
    KeyboardInterrupt (Ctrl-C during a model step) or CTRL_C_WHILE_PRINTING. ``live`` counts streams neither
    finished nor closed: what would hold KV blocks in the real engine."""

    def __init__(self, *scripts, room=1000, defaults=None):
        from qwen2_triton.runtime.input_processor import InputProcessor

        self.scripts, self.room = list(scripts), room
        self.generation_defaults = defaults or {}
        self.tokenizer = SimpleNamespace(encode=lambda text: [0],  # every prompt: one token
                                         apply_chat_template=lambda m, add_generation_prompt: json.dumps(m))
        # the engine's own max_tokens rule, over a context of ``room`` tokens
        self.inputs = InputProcessor(self.tokenizer, 10**6, room, room, self.generation_defaults)
        self.prompts, self.params, self.live = [], [], 0

    def room_after(self, n):
        return self.room - n

    def stream(self, prompt, params):
        self.prompts.append(prompt)
        self.params.append(params)
        return self._deltas(self.scripts.pop(0), params)

    def _deltas(self, script, params):
        self.live += 1
        try:
            for n, piece in enumerate(script, 1):
                if piece is KeyboardInterrupt:
                    raise KeyboardInterrupt
                if piece is CTRL_C_WHILE_PRINTING:
                    yield _CtrlCDelta()
                    continue
                finish = "stop" if n == len(script) else "length" if n == params.max_tokens else None
                yield SimpleNamespace(text=piece, token_ids=[n], finish_reason=finish)
                if finish:
                    return
        finally:
            self.live -= 1


def run_main(monkeypatch, capsys, fake, argv, inputs=()):
    """cli.main(argv) with ``fake`` as the LLM; ``inputs`` are what the user types (strings) or presses
    (EOFError = Ctrl-D, KeyboardInterrupt = Ctrl-C). Returns (status, stdout, stderr, live streams at each prompt)."""
    pending, live_at_prompt = list(inputs), []

    def scripted_input(prompt=""):
        print(prompt, end="")
        live_at_prompt.append(fake.live)
        item = pending.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(cli_mod, "_llm", lambda a: fake)
    monkeypatch.setattr("builtins.input", scripted_input)
    status = cli_mod.main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err, live_at_prompt
