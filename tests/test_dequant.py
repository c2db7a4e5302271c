"""model/dequant.py: its Q8_0 and Q5_0 paths give gguf.quants' values bit for bit, at chunk edges too, and every
other type is gguf.quants' own result."""
import numpy as np
import pytest

from qwen2_triton.model import dequant

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference  # noqa: E402

QT = gguf.GGMLQuantizationType
BLOCK_BYTES = {QT.Q8_0: 34, QT.Q5_0: 22}


def random_blocks(qtype, n_blocks, rng, finite_scales=True):
    raw = rng.integers(0, 256, size=(n_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    if finite_scales:  # fp16 scales of ordinary size; fully random bytes also hit inf/NaN/subnormal scales
        raw[:, :2] = rng.uniform(-0.1, 0.1, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def assert_bitwise_equal(ours, ref):
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("rows, blocks_per_row", [
    (1, 1), (7, 3), (13, 28),
    (3, dequant._CHUNK_BLOCKS // 2 + 5),  # chunks that end inside a row
    (2 * dequant._CHUNK_BLOCKS + 3, 1),  # a last, short chunk
])
def test_fast_paths_equal_gguf_quants(qtype, rows, blocks_per_row):
    rng = np.random.default_rng(rows * 1000 + blocks_per_row)
    data = random_blocks(qtype, rows * blocks_per_row, rng).reshape(rows, -1)
    ours = dequant.dequantize(data, qtype)
    assert ours.shape == (rows, blocks_per_row * 32)
    assert_bitwise_equal(ours, reference(data, qtype))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_0], ids=lambda t: t.name)
def test_any_bytes_equal_gguf_quants(qtype):
    """Every byte pattern: inf, NaN and subnormal scales, every quant value (NaN compared by bit pattern too)."""
    data = random_blocks(qtype, 4096, np.random.default_rng(7), finite_scales=False).reshape(64, -1)
    with np.errstate(invalid="ignore"):  # inf * 0 = NaN, in both
        assert_bitwise_equal(dequant.dequantize(data, qtype), reference(data, qtype))


def test_q5_0_every_value():
    """Each of the 32 values of a block takes each of its 32 levels: nibble order and the high bit per position."""
    levels = np.arange(32)
    q = (levels[None, :] + levels[:, None]) % 32  # block b, position j holds (b + j) % 32
    qs = ((q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)).astype(np.uint8)
    qh = ((q >> 4) << np.arange(32)).sum(axis=1).astype("<u4").view(np.uint8).reshape(32, 4)
    d = np.full((32, 1), 0.5, dtype=np.float16).view(np.uint8)
    data = np.concatenate([d, qh, qs], axis=1)
    ours = dequant.dequantize(data, QT.Q5_0)
    np.testing.assert_array_equal(ours, 0.5 * (q - 16).astype(np.float32))
    assert_bitwise_equal(ours, reference(data, QT.Q5_0))


def test_3d_shape_kept():
    data = random_blocks(QT.Q8_0, 2 * 3 * 4, np.random.default_rng(3)).reshape(2, 3, 4 * 34)
    assert dequant.dequantize(data, QT.Q8_0).shape == (2, 3, 128)


def test_other_types_are_gguf_quants():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=(3, 210), dtype=np.uint8)  # Q6_K: 210 bytes per 256 values
    raw[:, -2:] = np.array([0.01], dtype=np.float16).view(np.uint8)  # finite d
    assert_bitwise_equal(dequant.dequantize(raw, QT.Q6_K), reference(raw, QT.Q6_K))


def test_bad_block_data_is_an_error():
    with pytest.raises(ValueError, match="Q8_0 data must be uint8 rows of whole 34-byte blocks"):
        dequant.dequantize(np.zeros((2, 35), dtype=np.uint8), QT.Q8_0)
    with pytest.raises(ValueError, match="Q5_0 data must be uint8"):
        dequant.dequantize(np.zeros((2, 22), dtype=np.int8), QT.Q5_0)


def test_demo_embedding_and_lm_head_equal_gguf_quants(demo_gguf):
    """The two tensors the fast paths exist for (151936 x 896 each), against gguf.quants on the real data."""
    from qwen2_triton.model.gguf_file import read_gguf

    tensors = {t.name: t for t in read_gguf(demo_gguf).tensors}
    for name, qtype in (("token_embd.weight", QT.Q5_0), ("output.weight", QT.Q8_0)):
        t = tensors[name]
        assert t.tensor_type == qtype
        assert_bitwise_equal(dequant.dequantize(t.data, qtype), reference(t.data, qtype))
