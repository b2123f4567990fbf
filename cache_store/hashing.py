"""Chained, namespaced block hashes: the names of cached prefixes.

A prompt is cut into full blocks of `block_size` tokens (a trailing partial
block is never cached). Block i is named by

    h_0 = H(namespace)
    h_i = H(h_{i-1} || tokens of block i)        tokens as little-endian uint32

so h_i names the whole prefix up to and including block i, not just that
block's tokens: two prompts share h_i iff they share their namespace and their
first i blocks. That is what lets one Redis lookup per block answer "who holds
this prefix" and lets a prefix tree be keyed by hash alone.

The namespace is a sequence of length-prefixed fields (model fingerprint,
then cache salt), so ("ab", "c") and ("a", "bc") can never produce the same
bytes, and "no salt" differs from every salt. H is BLAKE2b with a 16-byte
digest: 2^64 work to find a collision by birthday search, and every hit is
still checked against the stored token ids, so a collision costs a miss,
never wrong KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

HASH_BYTES = 16
_VERSION = b"prefixcache.blockhash.v1"


def _h(data: bytes) -> BlockHash:
    return BlockHash(hashlib.blake2b(data, digest_size=HASH_BYTES).digest())


def _field(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def namespace(fingerprint: str, cache_salt: str | None) -> bytes:
    """Bytes that separate caches: one model fingerprint and one tenant salt.

    `fingerprint` already covers weights, dtype, block size and tokenizer
    (see worker.models.fingerprint); `cache_salt` is the tenant's.
    """
    if not fingerprint:
        raise ValueError("fingerprint must be a non-empty string")
    salt = b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8")
    return _field(_VERSION) + _field(fingerprint.encode("utf-8")) + _field(salt)


def root_hash(fingerprint: str, cache_salt: str | None) -> BlockHash:
    """h_0: the parent of the first block of every prompt in this namespace."""
    return _h(namespace(fingerprint, cache_salt))


def block_hash(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """h_i = H(h_{i-1} || uint32 tokens)."""
    return _h(parent + struct.pack(f"<{len(tokens)}I", *tokens))


def block_chain(root: BlockHash, token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, in order (h_1 .. h_n)."""
    chain: list[BlockHash] = []
    parent = root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        chain.append(parent)
    return chain


def token_blocks(token_ids: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
    """The full blocks of `token_ids` as tuples (the partial tail is dropped)."""
    n = len(token_ids) // block_size
    return [tuple(token_ids[i * block_size : (i + 1) * block_size]) for i in range(n)]
