"""How a frontend steps the engine core: with async output, the host's work on step N's outputs overlaps the
device's work on step N+1.

A step has two halves of host work around the device's: before it, scheduling and building inputs; after it,
reading the tokens back, then the frontend's output processing (detokenizing, stop strings, building and handing
out RequestOutputs), which at a large batch is the larger half (bench host: ~0.9 of 1.8 ms a step at batch 256
on this project's CPU). With ``overlap`` on, a step is:

    launch step N+1 (schedule, inputs, model, draw: queued on the device, no sync)
    process step N's outputs              <- the host works while the device runs step N+1
    collect step N+1 (token read-back, stops on token ids, the sequences advance)
    abort what step N's outputs finished by a stop string

vLLM V0's "async output processing", the first half of vLLM V1's async scheduling / SGLang's overlap scheduler
(those also schedule step N+1 before step N's tokens are known; here scheduling waits for them, so every step
is scheduled on exact state and nothing is ever rolled back). What it changes for a request:
- its outputs reach the frontend one step later (after the next launch, i.e. a step's host time);
- a request a stop string ends in step N is still in step N+1: that token is computed and dropped (the output
  processor ignores outputs of finished requests), and its blocks are freed after step N+1's collect.
Where the device's work is synchronous (the CPU), nothing overlaps, so ``overlap`` is on by default only on a GPU
(EngineConfig.async_output).
"""
from __future__ import annotations

from typing import Callable

from qwen2_triton.runtime.request import EngineCoreOutput

# the frontend's work on one step's outputs: returns the engine ids a stop string finished (for the core to abort)
Handler = Callable[[list[EngineCoreOutput]], list[str]]


class StepLoop:
    def __init__(self, core, overlap: bool):
        self.core, self.overlap = core, overlap
        self._held: list[EngineCoreOutput] | None = None  # collected, not yet handed to the frontend

    def has_work(self) -> bool:
        """Requests to run, or outputs still to hand out: keep stepping."""
        return self._held is not None or self.core.has_unfinished_requests()

    def step(self, handle: Handler) -> list[EngineCoreOutput]:
        """One step of the core; ``handle`` gets one step's outputs (with overlap: the previous step's, or the
        last one's when no request is left to launch). Returns the outputs it handled."""
        if not self.overlap:
            outputs = self.core.step()
            self._abort(handle(outputs))
            return outputs
        core = self.core
        launched = core.launch() if core.has_unfinished_requests() else None
        outputs, self._held = self._held or [], None
        try:
            aborts = handle(outputs) if outputs else []
        finally:  # the launched step is collected even when handling failed: the core stays consistent
            if launched is not None:
                self._held = core.collect(launched) or None
        self._abort(aborts)
        return outputs

    def _abort(self, engine_ids: list[str]) -> None:
        if engine_ids:
            self.core.abort_requests(engine_ids)
