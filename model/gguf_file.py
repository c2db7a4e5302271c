"""Read a GGUF file's metadata and tensor table: llama.cpp's container format, versions 2 and 3, little-endian.

    f = read_gguf("model.gguf")
    f.metadata["qwen2.block_count"]         # 24: plain Python values (int, float, bool, str, lists of them)
    f.tensors[0].data                       # numpy view of the memory-mapped file, nothing read yet

Why not gguf.GGUFReader: it builds a numpy view per metadata *element*, and a Qwen2 vocabulary is 151,936 tokens
plus 151,387 merges, so opening the demo model spent ~9-13 s of a ~17 s start-up there on a 2-core CPU. Reading the
same bytes with struct and numpy takes ~0.15 s. Values come out as GGUFReader's `field.contents()` gives them
(tests/test_gguf_file.py compares the two on the demo model and on written files); the gguf package still supplies
the type tables and the dequantization.

Layout (all little-endian):
    header        b"GGUF", u32 version, u64 tensor_count, u64 kv_count
    kv_count x    string key, u32 value type, value
    tensor_count x  string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 ggml type, u64 offset
    padding to general.alignment (default 32); then the tensor data, each offset relative to its start
    string = u64 byte length + UTF-8 bytes;  array = u32 element type, u64 count, the elements
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)  # as gguf.GGUFReader; version 1 used 32-bit counts and lengths
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: a corrupt file must fail with GGUFFormatError, not exhaust Python's recursion

# value type -> (struct format, numpy dtype) of a scalar
_SCALARS = {
    GGUFValueType.UINT8: ("<B", "<u1"), GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"), GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"), GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.UINT64: ("<Q", "<u8"), GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT32: ("<f", "<f4"), GGUFValueType.FLOAT64: ("<d", "<f8"),
    GGUFValueType.BOOL: ("<?", "?"),
}
# Element dtype of the tensor types gguf.GGUFReader also exposes as numbers; the others are raw bytes per row.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF: truncated, corrupt, or of a version or layout this reader does not know."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order: dims[0] (ne[0]) is the innermost, so the torch shape is reversed(dims)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray  # read-only view of the mapped file: elements (float/int types) or (rows..., row bytes)


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]  # key -> value, in file order
    value_types: dict[str, tuple[GGUFValueType, ...]]  # key -> (type,) or (ARRAY, element type[, ...])
    tensors: list[GGUFTensorInfo]  # in file order
    alignment: int
    data_offset: int  # start of the tensor data


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse `path`'s header, metadata and tensor table; tensor data stays on disk (memory-mapped).

    Raises GGUFFormatError (a ValueError) naming the file and what is wrong with it.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise GGUFFormatError(f"{path} is a truncated or corrupt GGUF file: it is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after the file is closed
    try:
        return _Parser(path, buf).parse()
    except GGUFFormatError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, MemoryError) as e:
        # struct.error / numpy's "buffer is smaller than requested": a read past the end, i.e. a count or length
        # that the file does not hold. UnicodeDecodeError is a ValueError: corrupt string bytes.
        raise GGUFFormatError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e


class _Parser:
    def __init__(self, path: str, buf: mmap.mmap):
        self.path, self.buf, self.size, self.pos = path, buf, len(buf), 0

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path} is a truncated or corrupt GGUF file: {what} "
                               f"(at byte {self.pos:,} of {self.size:,})")

    def parse(self) -> GGUFFile:
        if self.buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file: it starts with {self.buf[:4]!r}")
        self.pos = 4
        version = self.u32()
        if version & 0xFFFF == 0 and version != 0:
            raise GGUFFormatError(f"{self.path} is a big-endian GGUF file; only little-endian files are supported")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (versions "
                                  f"{', '.join(map(str, SUPPORTED_VERSIONS))} are)")
        n_tensors, n_kv = self.u64(), self.u64()
        metadata, types = {}, {}
        for _ in range(n_kv):
            key = self.string()
            if key in metadata:
                raise self.fail(f"metadata key {key!r} appears twice")
            types[key], metadata[key] = self.value(self.u32())
        infos = [self.tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in metadata and types["general.alignment"] != (GGUFValueType.UINT32,):
            raise self.fail("general.alignment is not a uint32")
        if alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment is {alignment}, not a power of two")
        data_offset = -(-self.pos // alignment) * alignment
        return GGUFFile(path=self.path, version=version, metadata=metadata, value_types=types,
                        tensors=self.tensors(infos, data_offset), alignment=alignment, data_offset=data_offset)

    # ---- primitives -------------------------------------------------------------------------------------
    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > self.size:
            raise self.fail(f"a string of {n:,} bytes runs past the end of the file")
        s = str(self.buf[self.pos:end], "utf-8")
        self.pos = end
        return s

    def value(self, vtype: int) -> tuple[tuple[GGUFValueType, ...], Any]:
        vtype = self.value_type(vtype)
        if vtype == GGUFValueType.STRING:
            return (vtype,), self.string()
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
            self.pos += struct.calcsize(fmt)
            return (vtype,), v
        return self.array()

    def value_type(self, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"unknown metadata value type {raw}") from None

    def array(self, depth: int = 0) -> tuple[tuple[GGUFValueType, ...], list]:
        if depth > MAX_NESTING:
            raise self.fail(f"arrays nested more than {MAX_NESTING} deep")
        etype, n = self.value_type(self.u32()), self.u64()
        if etype == GGUFValueType.STRING:
            if n * 8 > self.size - self.pos:  # each string has at least its 8-byte length
                raise self.fail(f"an array of {n:,} strings runs past the end of the file")
            return (GGUFValueType.ARRAY, etype), self.strings(n)
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype][1])
            if n * dtype.itemsize > self.size - self.pos:
                raise self.fail(f"an array of {n:,} {etype.name} values runs past the end of the file")
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return (GGUFValueType.ARRAY, etype), values
        # Arrays of arrays: flattened, as GGUFReader.contents() returns them. No known model file has one.
        if n > self.size - self.pos:
            raise self.fail(f"an array of {n:,} arrays runs past the end of the file")
        types, flat = (GGUFValueType.ARRAY,), []
        for i in range(n):
            sub_types, sub = self.array(depth + 1)
            types = (GGUFValueType.ARRAY, *sub_types) if i == 0 else types
            flat += sub
        return types, flat

    def strings(self, n: int) -> list[str]:
        # The hot loop: 151,936 tokens + 151,387 merges for Qwen2. Locals only; one bounds check at the end (a
        # slice past the end is short, so a bad length either fails unpack_from or ends past the size).
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out = [None] * n
        for i in range(n):
            (length,) = unpack(buf, pos)
            pos += 8
            out[i] = str(buf[pos:pos + length], "utf-8")
            pos += length
        if pos > self.size:
            raise self.fail("an array of strings runs past the end of the file")
        self.pos = pos
        return out

    # ---- tensors ----------------------------------------------------------------------------------------
    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        n_dims = self.u32()
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = tuple(self.u64() for _ in range(n_dims))
        raw_type, offset = self.u32(), self.u64()
        return name, dims, raw_type, offset

    def tensors(self, infos, data_offset: int) -> list[GGUFTensorInfo]:
        raw = np.frombuffer(self.buf, dtype=np.uint8)
        out, seen = [], set()
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise GGUFFormatError(f"{self.path} is a truncated or corrupt GGUF file: tensor {name} appears twice")
            seen.add(name)
            try:
                ttype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[ttype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{self.path}: tensor {name} has ggml type {raw_type}, which this version of "
                                      f"the gguf package does not know") from None
            n_elements = int(np.prod(dims, dtype=object)) if dims else 1
            shape = tuple(reversed(dims))  # numpy/torch order
            if dims and dims[0] % block:
                raise GGUFFormatError(f"{self.path} is a truncated or corrupt GGUF file: tensor {name} has rows of "
                                      f"{dims[0]} elements, not a multiple of the {ttype.name} block size {block}")
            n_bytes = n_elements // block * type_size
            start = data_offset + offset
            if start + n_bytes > self.size:
                raise GGUFFormatError(f"{self.path} is a truncated or corrupt GGUF file: tensor {name} "
                                      f"({n_bytes:,} bytes at {start:,}) ends past the end of the file "
                                      f"({self.size:,} bytes)")
            data = raw[start:start + n_bytes]
            if ttype in _ELEMENT_DTYPES:
                data = data.view(_ELEMENT_DTYPES[ttype]).reshape(shape)
            else:  # (rows..., bytes per row), the form gguf.quants.dequantize takes
                data = data.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else data
            out.append(GGUFTensorInfo(name=name, tensor_type=ttype, dims=dims, n_elements=n_elements,
                                      n_bytes=n_bytes, data_offset=start, data=data))
        return out
