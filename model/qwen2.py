"""The Qwen2 graph. It names the math; every op with a kernel comes from ``ops`` (runtime/backend.py).

    h = embed(ids)
    per layer:  x, r = norm1(h, r);  q,k,v = x @ Wqkv + b;  q = rope(q);  cache <- rope(k), v   (one op)
                a = attn(q, cache);  h = a @ Wo;  x, r = norm2(h, r);  h = swiglu(x @ Wgu) @ Wdown
    x, _ = norm(h, r);  logits = x[rows] @ lm_head
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2_triton.kernels.attention import AttentionMetadata
from qwen2_triton.kernels.rotary import build_cos_sin_cache, concat_cos_sin
from qwen2_triton.model.config import Qwen2Config
from qwen2_triton.model.sharding import TPShard


def parameter_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter of the fused model, by name (HF prefixes, fused qkv_proj and gate_up_proj)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.qkv_proj.weight": (qkv, h),
            p + "self_attn.qkv_proj.bias": (qkv,),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_up_proj.weight": (2 * i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def lm_head_name(params) -> str:
    """Which parameter the logits are computed with: lm_head.weight, or the embedding when tied (no lm_head.weight;
    either may be a quantized weight). The one rule for the graph, tuning and byte counts."""
    return "lm_head.weight" if "lm_head.weight" in params else "model.embed_tokens.weight"


class Qwen2Model:
    """Parameters in a flat dict plus a forward over a packed batch; no autograd, no nn.Module machinery."""

    def __init__(self, cfg: Qwen2Config, ops, dtype: torch.dtype, device: torch.device, tp=None, defer=()):
        """defer: parameter names left unallocated, which the loader puts in itself (quantized projections: a
        dense copy allocated first would make the load's peak the whole dense model)."""
        self.cfg, self.ops, self.dtype, self.device = cfg, ops, dtype, device
        # Tensor parallelism (tp: runtime/parallel_state.py TensorParallel, None on one device): this rank holds
        # the heads, MLP columns and vocabulary rows of model/sharding.py; local_cfg has its shapes (cfg without tp)
        self.tp = tp
        self.shard = TPShard(cfg, tp.rank, tp.world) if tp is not None else None
        self.local_cfg = self.shard.local_config() if tp is not None else cfg
        defer = frozenset(defer)
        self.params = {n: torch.empty(s, dtype=dtype, device=device)
                       for n, s in parameter_shapes(self.local_cfg).items() if n not in defer}
        # One buffer, one table per rope mode ("plain", and "yarn" when config.json has rope_scaling): a token
        # reads row position + rope_offsets[its request's mode], so one batch mixes modes.
        tables = cfg.rope_tables()
        self.cos_sin, self.rope_offsets = concat_cos_sin({
            mode: build_cos_sin_cache(inv_freq, rows, attn_factor, device=device)
            for mode, (inv_freq, attn_factor, rows) in tables.items()})
        self.rope_lengths = {mode: rows for mode, (_, _, rows) in tables.items()}  # positions each table covers
        self.scale = cfg.head_dim ** -0.5

    @property
    def lm_head(self) -> torch.Tensor:
        """The output projection (``lm_head_name``)."""
        return self.params[lm_head_name(self.params)]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_rows: torch.Tensor | None,
                rope_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: (T,). rope_rows: (T,) each token's row of ``cos_sin``, its position plus
        ``rope_offsets`` of its request's rope mode; None: every token in the config's own mode
        (cfg.static_rope_mode, as HF runs it). Returns float32 logits (len(logits_rows), vocab) for the requested
        rows (all rows when None)."""
        cfg, ops, P, tp = self.local_cfg, self.ops, self.params, self.tp  # this rank's heads and widths
        T = input_ids.shape[0]
        if rope_rows is None:
            offset = self.rope_offsets[cfg.static_rope_mode]
            rope_rows = positions + offset if offset else positions
        if tp is None:
            emb = P["model.embed_tokens.weight"]  # a tensor, or a GGUF table kept in its blocks (model/gguf_quant.py)
            h = F.embedding(input_ids, emb) if isinstance(emb, torch.Tensor) else emb.embedding(input_ids, self.dtype)
        else:
            h = tp.embedding(input_ids, P["model.embed_tokens.weight"], self.shard.vocab_start)
        residual = None
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}."
            if residual is None:
                x, residual = ops.rms_norm(h, P[p + "input_layernorm.weight"], cfg.rms_norm_eps), h
            else:
                x, residual = ops.rms_norm(h, P[p + "input_layernorm.weight"], cfg.rms_norm_eps, residual)
            qkv = ops.linear(x, P[p + "self_attn.qkv_proj.weight"], P[p + "self_attn.qkv_proj.bias"])
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = q.view(T, cfg.num_attention_heads, cfg.head_dim)  # (T, Hq, D) views into qkv
            k = k.view(T, cfg.num_key_value_heads, cfg.head_dim)
            v = v.view(T, cfg.num_key_value_heads, cfg.head_dim)
            k_cache, v_cache = kv_caches[n]
            q = ops.rotary_store_kv(q, k, v, rope_rows, self.cos_sin, k_cache, v_cache, meta.slot_mapping)
            a = ops.attention(q, k_cache, v_cache, meta, self.scale)  # (T, Hq, D)
            h = ops.linear(a.reshape(T, cfg.q_size), P[p + "self_attn.o_proj.weight"])
            if tp is not None:
                tp.all_reduce(h)  # row-parallel o_proj: each rank's heads give a partial sum
            x, residual = ops.rms_norm(h, P[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps, residual)
            h = ops.linear(ops.swiglu(ops.linear(x, P[p + "mlp.gate_up_proj.weight"])), P[p + "mlp.down_proj.weight"])
            if tp is not None:
                tp.all_reduce(h)  # row-parallel down_proj
        x, _ = ops.rms_norm(h, P["model.norm.weight"], cfg.rms_norm_eps, residual)
        if logits_rows is not None:
            x = x[logits_rows]
        logits = ops.linear(x, self.lm_head)  # (R, V), or (R, V/N) of this rank's rows
        if tp is not None:
            logits = tp.gather_logits(logits, self.cfg.vocab_size)
        return logits.float()
