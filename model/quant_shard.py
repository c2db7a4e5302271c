"""A tensor-parallel rank's part of a GPTQ / AWQ projection (model/sharding.py's Megatron layout, on the integers).

The packed tensors are read whole (they are 1/4 to 1/2 of the dense bytes) and unpacked into the format-independent
``IntLinear`` (codes (K, N), zeros and scales (G, N), g_idx (K,)); the rank's slice is taken there, where no
packing constrains where a slice may start:
- column-parallel (q/k/v, gate/up: output features): the codes', zeros' and scales' columns; g_idx unchanged;
- row-parallel (o_proj, down_proj: input features): the codes' rows and their g_idx entries; the groups those rows
  use are kept (scales, zeros) and renumbered from 0 in order, so act-order g_idx and a slice that starts inside a
  group stay exact.
Every weight a rank dequantizes is then bit-identical to the same slice of the whole weight dequantized. Whether the
Triton kernel can run a slice is kernels/quant_linear.py ``pack_quant_weight``'s call, as for any projection: a
row slice whose renumbered groups are in natural order packs (Qwen2-7B's o_proj at 2 ranks: 1792 rows = 14 groups of
128; a slice that only ends inside a group, as rank 0's 448 rows of Qwen2-0.5B's o_proj); one that starts inside a
group (rank 1's rows 448-895 there) or cuts act-order groups runs dequantized (model/quantization.py logs which).
vLLM refuses those layouts; here they are slower, not wrong.
"""
from __future__ import annotations

import torch

from qwen2_triton.model.quant_common import IntLinear
from qwen2_triton.model.sharding import TPShard


def shard_int_linear(lin: IntLinear, shard: TPShard, name: str, source: str) -> IntLinear:
    """This rank's part of checkpoint projection ``name`` (e.g. ``model.layers.0.self_attn.o_proj``), given whole."""
    split = shard.split_of(name + ".weight")
    if split is None:
        return lin
    dim, start, stop, full = split  # of the dense (N, K) weight: dim 0 = output features, 1 = input features
    k, n = lin.codes.shape
    if (n, k)[dim] != full:
        raise ValueError(f"{source}: {name} has {(n, k)[dim]} {('output', 'input')[dim]} features, the config "
                         f"implies {full}")
    if dim == 0:
        return IntLinear(lin.codes[:, start:stop].contiguous(), lin.zeros[:, start:stop].contiguous(),
                         lin.scales[:, start:stop].contiguous(), lin.g_idx, lin.bits, lin.group_size)
    used, local = torch.unique(lin.g_idx[start:stop], sorted=True, return_inverse=True)
    return IntLinear(lin.codes[start:stop].contiguous(), lin.zeros[used].contiguous(), lin.scales[used].contiguous(),
                     local, lin.bits, lin.group_size)
