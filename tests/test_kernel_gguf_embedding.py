"""GGUF embedding lookup (kernels/gguf_embedding.py) against F.embedding on the table model/dequant.py (gguf.quants)
decodes from the same blocks: equal bit for bit, since a lookup sums nothing."""
import numpy as np
import pytest
import torch

from qwen2_triton.kernels.gguf_embedding import gguf_embedding, gguf_embedding_ref
from qwen2_triton.kernels.gguf_linear import FORMATS
from qwen2_triton.kernels.testing import poisoned_allocations
import test_kernel_gguf_linear as tg
from test_kernel_gguf_linear import random_blocks, real_blocks, weight

demo_tensors = tg.demo_tensors  # its fixture


def _ids(n_rows: int, t: int, seed: int) -> torch.Tensor:
    """Repeats, the first and last rows, the rest random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_rows, (t,), generator=g)
    ids[:3] = torch.tensor([0, n_rows - 1, 0])
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", tuple(FORMATS))
def test_rows_equal_the_files_values(qtype, dtype, device):
    """T = 37 tokens (a partial token tile); K = 768 is 6 K tiles of 128, or 96 (3 blocks of 32: a partial tile)
    for the 32-value types; N = 53 rows."""
    k = 96 if FORMATS[qtype].super_rows == 0 else 768
    w, dense = weight(random_blocks(qtype, 53, k, seed=k), qtype)
    ids = _ids(53, 37, seed=1).to(device)
    with poisoned_allocations():  # an element left unwritten is NaN
        got = gguf_embedding(ids, w.to(device), dtype)
    assert got.dtype == dtype and got.shape == (37, k)
    assert torch.equal(got.cpu(), torch.nn.functional.embedding(ids.cpu(), dense.to(dtype)))
    assert torch.equal(got, gguf_embedding_ref(ids, w.to(device), dtype))


def test_real_blocks_and_int32_ids(demo_tensors, device):
    """Real Q6_K blocks of the demo model, and int32 ids (the engine passes int64; both are accepted)."""
    w, dense = weight(real_blocks(demo_tensors, "Q6_K", 40, 512), "Q6_K")
    ids = _ids(40, 19, seed=2).to(torch.int32).to(device)
    got = gguf_embedding(ids, w.to(device), torch.bfloat16)
    assert torch.equal(got.cpu(), dense.to(torch.bfloat16)[ids.long().cpu()])


def test_ids_outside_the_table_read_nothing(device):
    """Never passed by the engine (prompt ids are checked on the host), but never an out-of-bounds read either."""
    w, dense = weight(random_blocks("Q4_K", 8, 256, seed=4), "Q4_K")
    got = gguf_embedding(torch.tensor([3, 8, -1, 7], device=device), w.to(device), torch.float32).cpu()
    assert torch.equal(got[[0, 3]], dense[[3, 7]]) and not got[[1, 2]].any()


def test_empty_and_bad_inputs(device):
    w, _ = weight(random_blocks("Q8_0", 8, 64, seed=0), "Q8_0")
    w = w.to(device)
    assert gguf_embedding(torch.zeros(0, dtype=torch.int64, device=device), w, torch.float32).shape == (0, 64)
    with pytest.raises(ValueError, match="ids dtype must be one of"):
        gguf_embedding(torch.zeros(3, device=device), w, torch.float32)
    with pytest.raises(ValueError, match="ids must be 1-D"):
        gguf_embedding(torch.zeros(1, 3, dtype=torch.int64, device=device), w, torch.float32)


def test_a_wrong_row_is_caught(device):
    """The comparison can fail: a table whose columns (rows of the file) are shifted by one gives other rows."""
    from dataclasses import replace

    w, dense = weight(random_blocks("Q5_K", 16, 256, seed=5), "Q5_K")
    shifted = replace(w, **{f: getattr(w, f).roll(1, 1) for f in ("lo", "hi", "sub", "sub_min", "sup", "sup_min")})
    ids = torch.arange(16, device=device)
    assert not torch.equal(gguf_embedding(ids, shifted.to(device), torch.float32).cpu(), dense)
    np.testing.assert_array_equal(gguf_embedding(ids, w.to(device), torch.float32).cpu().numpy(), dense.numpy())
