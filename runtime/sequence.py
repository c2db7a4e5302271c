"""One request's state inside the engine core as it moves through the scheduler: token ids and KV blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qwen2_triton.runtime.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """The engine core's state of one request (the text side lives in runtime/output_processor.py)."""
    seq_id: int  # the core's own key (decode-graph rows, penalty rows)
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # resolved and validated
    seed: int  # 32-bit seed for the sampler's noise (the request's seed, or a random one)
    rope_mode: str = "plain"  # RoPE table of every token, never changed (runtime/rope_mode.py)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    num_prompt_scored: int = 1  # prompt positions whose log-probs were produced (position 0 has none)
    num_preemptions: int = 0
    # Prefix caching (runtime/block_manager.py): anything besides the token ids that changes their K/V (a rope mode,
    # a salt) goes into kv_key, which starts the hash chain; requests with different keys share no block.
    kv_key: str = ""
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of the leading full blocks of all_ids
    num_hashed_blocks: int = 0  # leading blocks of block_table offered to the prefix cache
    num_cached_tokens: int = 0  # tokens taken from the prefix cache at the last admission

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole concatenation."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n: end - n]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
