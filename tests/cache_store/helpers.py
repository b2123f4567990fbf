"""Tiny KV shapes and KV contents derived from block hashes, so any wrong block is visible."""

import torch

from cache_store import CacheConfig, KVShape, TieredStore
from cache_store.hashing import block_chain, root_hash, token_blocks
from cache_store.tree import DEVICE, HOST

SHAPE = KVShape(layers=2, kv_heads=1, block_size=4, head_dim=2, dtype=torch.float32)
BB = SHAPE.block_bytes


def make_store(device_blocks: int, host_blocks: int, **kw) -> TieredStore:
    cfg = CacheConfig(block_size=SHAPE.block_size, device_bytes=device_blocks * BB, host_bytes=host_blocks * BB, **kw)
    return TieredStore(cfg, SHAPE)


def chain(tokens, salt=None, fingerprint="m"):
    return block_chain(root_hash(fingerprint, salt), tokens, SHAPE.block_size), token_blocks(tokens, SHAPE.block_size)


def kv_for(hashes) -> torch.Tensor:
    """[n, layers, 2, heads, block, dim]; every value encodes its block hash and position."""
    out = torch.empty((len(hashes), *SHAPE.block_dims))
    pos = torch.arange(torch.Size(SHAPE.block_dims).numel(), dtype=torch.float32).reshape(SHAPE.block_dims)
    for i, h in enumerate(hashes):
        out[i] = int.from_bytes(h[:2], "little") * 1000 + pos
    return out


def expected_layers(hashes):
    """What gather must return for these blocks: per layer [1, heads, n*block, dim]."""
    kv = kv_for(hashes)  # [n, L, 2, H, B, D]
    n = len(hashes)
    seq = kv.permute(1, 2, 3, 0, 4, 5).reshape(SHAPE.layers, 2, SHAPE.kv_heads, n * SHAPE.block_size, SHAPE.head_dim)
    return [(seq[layer, 0].unsqueeze(0), seq[layer, 1].unsqueeze(0)) for layer in range(SHAPE.layers)]


def gather(store, hold, n_tokens=None):
    """Per-layer (key, value) of a held prefix, each [1, heads, tokens, dim], read from the pool of
    each block's tier; a hold is device blocks then host blocks, never the other way round."""
    tiers = [b.tier for b in hold.blocks]
    assert tiers == sorted(tiers, key=lambda t: t != DEVICE) and set(tiers) <= {DEVICE, HOST}, tiers
    pools = {DEVICE: store.device_pool, HOST: store.host_pool}
    kv = torch.stack([pools[b.tier].read([b.slot])[0].cpu() for b in hold.blocks]) if hold.blocks else kv_for([])
    n = len(hold.blocks)
    seq = kv.permute(1, 2, 3, 0, 4, 5).reshape(SHAPE.layers, 2, SHAPE.kv_heads, n * SHAPE.block_size, SHAPE.head_dim)
    seq = seq[:, :, :, :n_tokens] if n_tokens is not None else seq
    return [(seq[layer, 0].unsqueeze(0), seq[layer, 1].unsqueeze(0)) for layer in range(SHAPE.layers)]


def add_path(tree, tokens, tier=DEVICE, slot0=0, salt=None):
    """Inserts the blocks of `tokens` into a bare PrefixTree (no pools), slots numbered from `slot0`."""
    hashes, blocks = chain(tokens, salt)
    parent = None
    for i, (h, b) in enumerate(zip(hashes, blocks)):
        if h not in tree:
            tree.insert(parent, h, b, tier, slot0 + i)
        parent = h
    return hashes, blocks


def serve(store, tokens, salt=None):
    """What the engine does: acquire the cached prefix, insert the rest, release. Returns blocks hit."""
    hashes, blocks = chain(tokens, salt)
    hold = store.acquire(hashes, blocks)
    try:
        n = len(hold)
        parent = hashes[n - 1] if n else None
        store.insert(parent, hashes[n:], blocks[n:], kv_for(hashes[n:]))
    finally:
        store.release(hold)
    return n
