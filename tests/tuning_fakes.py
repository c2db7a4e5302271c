"""A stand-in for the tuner's timers (runtime/tuning.py, runtime/quant_tuning.py): no GPU, chosen times."""
from __future__ import annotations

from qwen2_triton.runtime.tuning import config_label


def fake_timer(times: dict, calls: list | None = None):
    """A ``time_ms(cfg)`` that returns ``times[config_label(cfg)]`` (raising it when it is an exception) and, with
    ``calls``, records each config it was asked to time."""
    def time_ms(cfg):
        if calls is not None:
            calls.append(cfg)
        t = times[config_label(cfg)]
        if isinstance(t, Exception):
            raise t
        return t
    return time_ms
