"""Automatic prefix caching: names for full KV blocks, so a new request can reuse the blocks of a prompt prefix that
another request already computed (vLLM's automatic prefix caching, SGLang's RadixAttention).

A full block's K/V depend on every token before it, not only on its own, so a block is named by a chain hash:

    h(block 0) = H(root(kv_key) || tokens of block 0)
    h(block i) = H(h(block i-1) || tokens of block i)

``kv_key`` is everything besides the token ids that changes the K/V of the same tokens (the rope mode a request
runs with, a per-tenant salt); it enters through the root, so it reaches every block of the chain. H is blake2b
with 16-byte digests over fixed-width fields (16-byte parent, 4-byte little-endian token ids), so no two inputs
share an encoding and a collision, which would silently hand one request another's K/V, is a 2^-64 event
(Python's ``hash`` of a tuple, 64 bits with known collisions, is not used). Hashing is ~1 us per 16-token block.

Only full blocks are named: a partial block is still being written by its sequence and is never shared.
runtime/block_manager.py keeps the table below, the reference counts, and the LRU order of eviction.
"""
from __future__ import annotations

import hashlib
import struct

DIGEST_BYTES = 16


def root_hash(kv_key: str) -> bytes:
    """The parent of a sequence's first block."""
    return hashlib.blake2b(b"qwen2-triton kv\0" + kv_key.encode(), digest_size=DIGEST_BYTES).digest()


def block_hash(parent: bytes, token_ids) -> bytes:
    return hashlib.blake2b(parent + struct.pack(f"<{len(token_ids)}I", *token_ids),
                           digest_size=DIGEST_BYTES).digest()


def extend_block_hashes(hashes: list[bytes], kv_key: str, token_slice, num_full_blocks: int,
                        block_size: int) -> list[bytes]:
    """Append to ``hashes`` (a sequence's hashes of its leading full blocks, kept on the sequence since tokens only
    ever grow) until it names ``num_full_blocks`` blocks. ``token_slice(start, end)`` gives the token ids."""
    for i in range(len(hashes), num_full_blocks):
        parent = hashes[i - 1] if i else root_hash(kv_key)
        hashes.append(block_hash(parent, token_slice(i * block_size, (i + 1) * block_size)))
    return hashes


class PrefixCache:
    """Hash <-> block id of the blocks whose K/V are known, whether a running sequence holds them or they are free
    and evictable. One hash names at most one block: when two sequences compute the same block at once (two equal
    prompts admitted in one step), the first registered stays and the other copy stays private."""

    def __init__(self):
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.block_of)

    def longest_prefix(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest run of leading hashes that are all cached."""
        out = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> bool:
        """Name ``block`` by ``h``; False (nothing changes) if ``h`` already names a block."""
        if h in self.block_of:
            return False
        assert block not in self.hash_of, f"block {block} is already cached"
        self.block_of[h] = block
        self.hash_of[block] = h
        return True

    def evict(self, block: int) -> None:
        """Forget ``block``'s content (it is about to be rewritten); a no-op for an uncached block."""
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.block_of[h]
