"""Which slice of every Qwen2 weight a tensor-parallel rank holds (Megatron layout), and reading only that slice.

    q/k/v, gate/up:        column-parallel: rank r holds output rows (whole heads; biases with them)
    o_proj, down_proj:     row-parallel: rank r holds input columns; partial sums, one all-reduce each
    embed_tokens, lm_head: vocab-parallel: rank r holds ceil(V/N) rows (the last rank zero-padded)
    norms:                 replicated

With more ranks than KV heads (Qwen2-0.5B/1.5B have 2, 7B has 4) each KV head is replicated on N/Hkv ranks,
as vLLM does: rank r's query heads [r*Hq/N, (r+1)*Hq/N) all belong to KV head r // (N/Hkv) (N divides Hq), so
every rank holds exactly one KV head, the one its query heads read.

The per-rank shapes are a Qwen2Config of their own (``local_config``): heads, KV heads, intermediate size and
vocabulary rows of one rank, so model/qwen2.py ``parameter_shapes`` and weights.py ``load_into`` work unchanged
on a shard.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch

from qwen2_triton.model.config import Qwen2Config

# checkpoint name suffix -> (dim that is split, what is split: "q" heads, "kv" heads, "mlp" columns, "vocab")
SPLITS = {
    "self_attn.q_proj.weight": (0, "q"), "self_attn.q_proj.bias": (0, "q"),
    "self_attn.k_proj.weight": (0, "kv"), "self_attn.k_proj.bias": (0, "kv"),
    "self_attn.v_proj.weight": (0, "kv"), "self_attn.v_proj.bias": (0, "kv"),
    "self_attn.o_proj.weight": (1, "q"),
    "mlp.gate_proj.weight": (0, "mlp"), "mlp.up_proj.weight": (0, "mlp"),
    "mlp.down_proj.weight": (1, "mlp"),
    "model.embed_tokens.weight": (0, "vocab"), "lm_head.weight": (0, "vocab"),
}


def check_divisible(cfg: Qwen2Config, world: int, source: str = "the model") -> None:
    """ValueError unless ``world`` ranks can each hold whole heads and an equal share of the MLP (before any
    process starts or any weight loads)."""
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {world!r}")
    h, kv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    if h % world:
        raise ValueError(f"tensor_parallel_size={world} does not divide the {h} attention heads of {source} "
                         f"(each rank holds whole heads); use one of {_divisors(h)}")
    if inter % world:
        raise ValueError(f"tensor_parallel_size={world} does not divide intermediate_size {inter} of {source}")
    if world <= kv and kv % world:
        raise ValueError(f"tensor_parallel_size={world} does not divide the {kv} KV heads of {source}")
    if world > kv and world % kv:
        raise ValueError(f"tensor_parallel_size={world} exceeds the {kv} KV heads of {source} and is not a multiple "
                         f"of them, so KV heads cannot be replicated evenly; use one of "
                         f"{[d for d in _divisors(h) if d % kv == 0 or kv % d == 0]}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class TPShard:
    """Rank ``rank`` of ``world``: what it holds of a model of config ``cfg`` (the whole model's)."""
    cfg: Qwen2Config
    rank: int
    world: int

    @property
    def heads(self) -> int:  # query heads per rank
        return self.cfg.num_attention_heads // self.world

    @property
    def kv_heads(self) -> int:  # KV heads per rank (1 when replicated)
        return max(1, self.cfg.num_key_value_heads // self.world)

    @property
    def kv_head_start(self) -> int:
        kv = self.cfg.num_key_value_heads
        return self.rank * kv // self.world if self.world <= kv else self.rank // (self.world // kv)

    @property
    def kv_replicas(self) -> int:  # ranks holding each KV head
        return max(1, self.world // self.cfg.num_key_value_heads)

    @property
    def intermediate(self) -> int:
        return self.cfg.intermediate_size // self.world

    @property
    def vocab_rows(self) -> int:  # per rank, padded: ceil(V / N)
        return -(-self.cfg.vocab_size // self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    def local_config(self) -> Qwen2Config:
        """This rank's shapes as a config: the graph and the loader size everything from it."""
        return replace(self.cfg, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                       intermediate_size=self.intermediate, vocab_size=self.vocab_rows)

    def split_of(self, name: str) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, full length of dim) of checkpoint tensor ``name`` on this rank; None: replicated."""
        split = _split(name)
        if split is None:
            return None
        dim, kind = split
        c, d = self.cfg, self.cfg.head_dim
        if kind == "q":
            n, full = self.heads * d, c.num_attention_heads * d
            return dim, self.rank * n, (self.rank + 1) * n, full
        if kind == "kv":
            return dim, self.kv_head_start * d, (self.kv_head_start + self.kv_heads) * d, c.num_key_value_heads * d
        if kind == "mlp":
            return dim, self.rank * self.intermediate, (self.rank + 1) * self.intermediate, c.intermediate_size
        start = self.vocab_start
        return dim, min(start, c.vocab_size), min(start + self.vocab_rows, c.vocab_size), c.vocab_size

    def take(self, name: str, source, shape: tuple[int, ...], where: str) -> torch.Tensor:
        """This rank's slice of tensor ``name`` (full shape ``shape``), read from ``source``: a torch tensor or
        a safetensors slice (then only the slice is read from the file). Vocabulary rows past the end (the last
        rank when N does not divide V) are zeros: their logits are cut off after the gather."""
        split = self.split_of(name)
        if split is None:
            return source[:] if not isinstance(source, torch.Tensor) else source
        dim, start, stop, full = split
        if len(shape) <= dim or shape[dim] != full:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(shape)}, the config implies {full} along "
                             f"dim {dim}")
        t = source[start:stop] if dim == 0 else source[:, start:stop]
        if _split(name)[1] == "vocab" and stop - start < self.vocab_rows:
            t = torch.cat([t, t.new_zeros((self.vocab_rows - (stop - start), *t.shape[1:]))])
        return t


def _split(name: str) -> tuple[int, str] | None:
    suffix = next((s for s in SPLITS if name == s or name.endswith("." + s)), None)
    return SPLITS[suffix] if suffix is not None else None


def iter_safetensors_shard(paths: list[str], shard: TPShard) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's slice) for every tensor of the checkpoint, each slice read from the file's memory map
    alone (safetensors ``get_slice``), so a rank reads about 1/N of the weights."""
    from safetensors import safe_open

    for path in paths:
        try:
            f = safe_open(path, framework="pt", device="cpu")
            names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path}: not a readable safetensors file ({os.path.getsize(path)} bytes): {e}") \
                from None
        for name in names:
            try:
                if shard.split_of(name) is None:
                    t = f.get_tensor(name)
                else:
                    s = f.get_slice(name)
                    t = shard.take(name, s, tuple(s.get_shape()), path)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"{path}: tensor {name!r} cannot be read (truncated or corrupt file?): {e}") \
                    from None
            yield name, t


def shard_tensors(tensors: Iterable[tuple[str, torch.Tensor]], shard: TPShard,
                  source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's slice) of whole tensors (a GGUF's, after dequantization)."""
    for name, t in tensors:
        yield name, shard.take(name, t, tuple(t.shape), source)


def layout(cfg: Qwen2Config, world: int, dtype_bytes: int) -> str:
    """One line on what each of ``world`` ranks holds and what crosses between them, or why it cannot split."""
    try:
        check_divisible(cfg, world)
    except ValueError as e:
        return f"does not split: {e}"
    s = TPShard(cfg, 0, world)
    kv = f"{s.kv_heads}/{cfg.num_key_value_heads} KV heads" + (
        f" (each on {s.kv_replicas} ranks)" if s.kv_replicas > 1 else "")
    return (f"per rank {s.heads}/{cfg.num_attention_heads} heads, {kv}, {s.intermediate}/{cfg.intermediate_size} "
            f"MLP columns, {s.vocab_rows}/{cfg.vocab_size} vocabulary rows; per token 2 all-reduces per layer of "
            f"{cfg.hidden_size * dtype_bytes:,} B each")
