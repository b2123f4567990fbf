import hashlib
import struct
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from cache_store.hashing import HASH_BYTES, block_chain, block_hash, namespace, root_hash, token_blocks

# Published test vector: any implementation (another process, machine or
# language) must produce these bytes, or caches would silently stop sharing.
VECTOR_ROOT = "3bdf8b19bdc0ffcf360a4a267ce3c25b"  # root_hash("test-model", None)
VECTOR_CHAIN = ["a1e450ba5815e6ba6416500d6608f14b", "5ba740c6649e35889395b4ce3b088903"]  # tokens 0..39, block 16
VECTOR_SALTED_ROOT = "142a702ae7108704a7d84f6350ffcf47"  # root_hash("test-model", "tenant-a")


def test_published_vector():
    root = root_hash("test-model", None)
    assert root.hex() == VECTOR_ROOT
    assert [h.hex() for h in block_chain(root, list(range(40)), 16)] == VECTOR_CHAIN
    assert root_hash("test-model", "tenant-a").hex() == VECTOR_SALTED_ROOT


def test_vector_follows_the_documented_construction():
    """Recompute the vector from the spec in the module docstring, without the module's helpers."""

    def field(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    ns = field(b"prefixcache.blockhash.v1") + field(b"test-model") + field(b"\x00")
    h0 = hashlib.blake2b(ns, digest_size=16).digest()
    h1 = hashlib.blake2b(h0 + struct.pack("<16I", *range(16)), digest_size=16).digest()
    h2 = hashlib.blake2b(h1 + struct.pack("<16I", *range(16, 32)), digest_size=16).digest()
    assert [h0.hex(), h1.hex(), h2.hex()] == [VECTOR_ROOT, *VECTOR_CHAIN]


def test_deterministic_across_processes():
    code = (
        "from cache_store.hashing import root_hash, block_chain;"
        "print(block_chain(root_hash('test-model', None), list(range(40)), 16)[-1].hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == VECTOR_CHAIN[-1]


def test_only_full_blocks_are_hashed():
    root = root_hash("m", None)
    assert block_chain(root, list(range(15)), 16) == []
    assert len(block_chain(root, list(range(16)), 16)) == 1
    assert len(block_chain(root, list(range(47)), 16)) == 2
    assert token_blocks(list(range(47)), 16) == [tuple(range(16)), tuple(range(16, 32))]
    assert all(len(h) == HASH_BYTES for h in block_chain(root, list(range(64)), 16))


def test_namespace_separates_models_and_salts():
    roots = {
        root_hash("model-a", None),
        root_hash("model-b", None),
        root_hash("model-a", "t1"),
        root_hash("model-a", "t2"),
        root_hash("model-a", ""),
    }
    assert len(roots) == 5


def test_length_prefix_prevents_field_shifting():
    # Without length prefixes "ab"+"c" and "a"+"bc" would concatenate to the same bytes.
    assert namespace("ab", "c") != namespace("a", "bc")
    assert root_hash("ab", "c") != root_hash("a", "bc")
    assert namespace("a", None) != namespace("a", "")


@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=80),
    st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=80),
)
def test_shared_hash_iff_shared_prefix(a, b):
    bs = 4
    root = root_hash("m", None)
    ca, cb = block_chain(root, a, bs), block_chain(root, b, bs)
    for i in range(min(len(ca), len(cb))):
        assert (ca[i] == cb[i]) == (a[: (i + 1) * bs] == b[: (i + 1) * bs])


def test_block_hash_depends_on_parent():
    toks = list(range(16))
    assert block_hash(root_hash("m", None), toks) != block_hash(root_hash("m", "s"), toks)
