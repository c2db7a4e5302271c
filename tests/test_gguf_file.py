"""model/gguf_file.py against gguf.GGUFReader (the reference it replaces for speed): the same metadata values, types
and order, the same tensor table and bytes, the same tokenizer; and a damaged file is always a GGUFFormatError."""
import struct

import numpy as np
import pytest

from qwen2_triton.model.gguf_file import GGUFFormatError, read_gguf
from qwen2_triton.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
QT, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType


def reader_view(reader):
    """GGUFReader's metadata (less its GGUF.* header pseudo-keys) and types, as read_gguf reports them."""
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return {k: f.contents() for k, f in fields.items()}, {k: tuple(f.types) for k, f in fields.items()}


def assert_same_as_reader(path):
    ours, reader = read_gguf(path), gguf.GGUFReader(path)
    values, types = reader_view(reader)
    assert list(ours.metadata) == list(values)  # same keys, same order
    for key, value in values.items():
        assert type(ours.metadata[key]) is type(value), key
        assert ours.metadata[key] == value, key
        # A value of the right type and value but read as, say, INT16 instead of UINT16 would still differ here.
        if value == [] and types[key] == (VT.ARRAY,):  # GGUFReader drops an empty array's element type; we keep it
            assert ours.value_types[key][0] == VT.ARRAY and len(ours.value_types[key]) == 2, key
        else:
            assert ours.value_types[key] == types[key], key
    assert ours.data_offset == reader.data_offset and ours.alignment == reader.alignment
    assert len(ours.tensors) == len(reader.tensors)
    for a, b in zip(ours.tensors, reader.tensors):
        assert (a.name, a.tensor_type, a.dims, a.n_elements, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, tuple(b.shape.tolist()), b.n_elements, b.n_bytes, b.data_offset), b.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, b.name
        assert np.array_equal(a.data.view(np.uint8), np.asarray(b.data).view(np.uint8)), b.name
        assert not a.data.flags.writeable  # a view of the file, never a way to change it
    return ours, reader


# ---- the demo model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_pair(demo_gguf):
    return assert_same_as_reader(demo_gguf)  # ~10 s: GGUFReader is the slow reference


def test_demo_metadata_and_tensors_match_reader(demo_pair):
    ours, _ = demo_pair
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 151936
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 151387
    assert ours.metadata["tokenizer.ggml.tokens"][151645] == "<|im_end|>"
    assert ours.metadata["tokenizer.ggml.merges"][0] == "Ġ Ġ"
    assert len(ours.tensors) == 291


def test_demo_tokenizer_is_identical(demo_pair):
    """The tokenizer built from our parse is the one built from GGUFReader's, down to the serialized JSON."""
    ours, reader = demo_pair
    a, b = Tokenizer.from_gguf_metadata(ours), Tokenizer.from_gguf_metadata(reader)
    assert a.backend.to_str() == b.backend.to_str()
    assert (a.chat_template, a.special_tokens, a.eos_token_ids, a.pad_token_id, a.vocab_size) == (
        b.chat_template, b.special_tokens, b.eos_token_ids, b.pad_token_id, b.vocab_size)


# ---- every value type, written by gguf.GGUFWriter ----------------------------------------------------------------
SCALARS = [("u8", 200, VT.UINT8), ("i8", -100, VT.INT8), ("u16", 60000, VT.UINT16), ("i16", -30000, VT.INT16),
           ("u32", 4_000_000_000, VT.UINT32), ("i32", -2_000_000_000, VT.INT32), ("f32", 0.1, VT.FLOAT32),
           ("u64", 2**63 + 5, VT.UINT64), ("i64", -(2**62), VT.INT64), ("f64", 1e-300, VT.FLOAT64),
           ("yes", True, VT.BOOL), ("no", False, VT.BOOL)]


def write_every_type(path, *, alignment=None):
    w = gguf.GGUFWriter(str(path), "qwen2")
    if alignment:
        w.add_custom_alignment(alignment)
    for key, value, vtype in SCALARS:
        w.add_key_value(f"s.{key}", value, vtype)
    w.add_string("s.text", "plain ASCII")
    w.add_string("s.unicode", "Ġ 你好 👍🏽 \n\t")
    w.add_key_value("s.empty", "", VT.STRING)  # add_string skips empty strings
    for key, values, vtype in [("u8", [0, 255, 7], VT.UINT8), ("i8", [-128, 127], VT.INT8),
                               ("u16", [65535, 1], VT.UINT16), ("i16", [-32768, 5], VT.INT16),
                               ("u32", [2**32 - 1, 0], VT.UINT32), ("i32", [-1, 3, 1 << 30], VT.INT32),
                               ("f32", [0.1, -2.5, 1e-6], VT.FLOAT32), ("u64", [2**64 - 1], VT.UINT64),
                               ("i64", [-(2**63)], VT.INT64), ("f64", [0.1, 1e300], VT.FLOAT64),
                               ("bool", [True, False, True], VT.BOOL)]:
        w.add_array(f"a.{key}", values) if vtype in (VT.INT32, VT.FLOAT32, VT.BOOL) else \
            w.add_key_value(f"a.{key}", values, VT.ARRAY, sub_type=vtype)
    w.add_array("a.strings", ["a", "", "Ġthe", "你好", "👨‍👩‍👧", "x" * 1000])
    w.add_array("a.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("a.nested_strings", [["a", "b"], ["c"]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), QT.Q8_0),
                 raw_dtype=QT.Q8_0)
    w.add_tensor("q4k", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=QT.Q4_K)  # 2 rows of 256
    w.add_tensor("bf16", rng.integers(0, 2**16, (3, 4), dtype=np.uint16).view(np.uint8).reshape(3, 8),
                 raw_dtype=QT.BF16)
    w.add_tensor("vector", rng.standard_normal(33).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_matches_reader(tmp_path, alignment):
    write_every_type(tmp_path / "types.gguf", alignment=alignment)
    ours, _ = assert_same_as_reader(tmp_path / "types.gguf")
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0
    meta = ours.metadata
    for key, value, _ in SCALARS:
        assert meta[f"s.{key}"] == (pytest.approx(value, rel=1e-7) if key == "f32" else value), key
    assert meta["s.unicode"] == "Ġ 你好 👍🏽 \n\t" and meta["s.empty"] == ""
    assert meta["a.strings"] == ["a", "", "Ġthe", "你好", "👨‍👩‍👧", "x" * 1000]
    assert meta["a.u64"] == [2**64 - 1] and meta["a.bool"] == [True, False, True]
    assert meta["a.nested"] == [1, 2, 3, 4, 5, 6]  # flattened, as GGUFReader.contents() gives it
    f32 = {t.name: t for t in ours.tensors}["f32"]
    assert f32.dims == (5, 3) and f32.data.shape == (3, 5)  # GGUF order vs numpy order


# ---- hand-written files for what GGUFWriter will not write -------------------------------------------------------
def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def raw_gguf(kvs=(), tensors=(), *, version=3, magic=b"GGUF", data=b"") -> bytes:
    """A GGUF from raw pieces: kvs = [(key, type, packed value)], tensors = [(name, dims, ggml type, offset)]."""
    out = magic + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, packed in kvs:
        out += _str(key) + struct.pack("<I", vtype) + packed
    for name, dims, ttype, offset in tensors:
        out += _str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, offset)
    return out + bytes(-len(out) % 32) + data


def test_empty_arrays(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(raw_gguf([(b"a.strings", VT.ARRAY, struct.pack("<IQ", VT.STRING, 0)),
                               (b"a.ints", VT.ARRAY, struct.pack("<IQ", VT.INT32, 0))]))
    ours, _ = assert_same_as_reader(path)
    assert ours.metadata == {"a.strings": [], "a.ints": []}
    assert ours.value_types == {"a.strings": (VT.ARRAY, VT.STRING), "a.ints": (VT.ARRAY, VT.INT32)}


@pytest.mark.parametrize("content, match", [
    (raw_gguf(version=1), "version 1 is not supported"),
    (raw_gguf(version=4), "version 4 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (raw_gguf([(b"k", VT.UINT8, b"\x01"), (b"k", VT.UINT8, b"\x02")]), "key 'k' appears twice"),
    (raw_gguf([(b"k", 99, b"")]), "unknown metadata value type 99"),
    (raw_gguf([(b"general.alignment", VT.UINT32, struct.pack("<I", 48))]), "not a power of two"),
    (raw_gguf([(b"general.alignment", VT.UINT64, struct.pack("<Q", 64))]), "alignment is not a uint32"),
    (raw_gguf(tensors=[(b"t", (4,), 99, 0)], data=bytes(64)), "ggml type 99"),
    (raw_gguf(tensors=[(b"t", (4,), QT.F32, 0), (b"t", (4,), QT.F32, 32)], data=bytes(64)), "t appears twice"),
    (raw_gguf(tensors=[(b"t", (1, 1, 1, 1, 1), QT.F32, 0)], data=bytes(64)), "5 dimensions"),
    (raw_gguf(tensors=[(b"t", (48,), QT.Q8_0, 0)], data=bytes(64)), "not a multiple of the Q8_0 block size"),
    (raw_gguf(tensors=[(b"t", (32,), QT.F32, 0)], data=bytes(100)), r"ends past the end of the file"),
    (raw_gguf([(b"k", VT.STRING, struct.pack("<Q", 2**40) + b"abc")]), "string of 1,099,511,627,776 bytes"),
    (raw_gguf([(b"k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**60))]), "array of 1,152,921,504,606,846,976 str"),
    (raw_gguf([(b"k", VT.ARRAY, struct.pack("<IQ", VT.INT32, 2**61))]), "INT32 values runs past the end"),
    (raw_gguf([(b"k", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) * 20 + struct.pack("<IQ", VT.INT32, 0))]),
     "nested more than 8 deep"),
    (raw_gguf([(b"k", VT.STRING, _str(b"\xff\xfe"))]), "UnicodeDecodeError"),
])
def test_bad_files_say_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError, match=match) as e:
        read_gguf(path)
    assert "bad.gguf" in str(e.value)


def test_every_truncation_is_a_format_error(tmp_path):
    """Cut anywhere in the header, metadata or tensor table (and a bit into the data): GGUFFormatError, never a
    struct.error, IndexError or a half-read file."""
    write_every_type(tmp_path / "types.gguf")
    data = (tmp_path / "types.gguf").read_bytes()
    end = read_gguf(tmp_path / "types.gguf").data_offset + 40
    for keep in range(end):
        (tmp_path / "cut.gguf").write_bytes(data[:keep])
        with pytest.raises(GGUFFormatError, match="cut.gguf"):
            read_gguf(tmp_path / "cut.gguf")


def test_corrupted_bytes_never_escape_as_other_errors(tmp_path):
    """Random byte damage in the metadata and tensor table: the file either still parses or is a GGUFFormatError
    (no MemoryError from a huge count, no RecursionError, no hang)."""
    write_every_type(tmp_path / "types.gguf")
    data = (tmp_path / "types.gguf").read_bytes()
    end = read_gguf(tmp_path / "types.gguf").data_offset
    rng = np.random.default_rng(1)
    failures = 0
    for _ in range(400):
        damaged = bytearray(data)
        for pos in rng.integers(4, end, size=rng.integers(1, 4)):
            damaged[pos] = int(rng.integers(0, 256))
        (tmp_path / "bad.gguf").write_bytes(damaged)
        try:
            read_gguf(tmp_path / "bad.gguf")
        except GGUFFormatError:
            failures += 1
    assert failures > 200  # the damage was real (measured: 338 of 400 rejected)
