"""Wire format of KV blocks sent to a peer: msgpack metadata + one flat uint8 numpy array.

numpy (not a torch tensor) so Ray's object store hands the receiver a
zero-copy view; metadata as msgpack so nothing is unpickled by our code.
The receiver checks every field before the bytes go near its pools.
"""

from __future__ import annotations

import warnings

import msgpack
import numpy as np
import torch

from cache_store import BlockHash, Exported

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class BadTransfer(ValueError):
    """A peer sent blocks that do not decode to what was asked."""


def pack_blocks(ex: Exported) -> tuple[bytes, np.ndarray]:
    meta = {
        "hashes": [bytes(h) for h in ex.hashes],
        "tokens": [list(t) for t in ex.tokens],
        "dtype": str(ex.kv.dtype).replace("torch.", ""),
        "shape": list(ex.kv.shape),
    }
    data = ex.kv.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return msgpack.packb(meta), data


def unpack_blocks(meta_bytes: bytes, data: np.ndarray) -> Exported:
    try:
        meta = msgpack.unpackb(meta_bytes)
        hashes = [BlockHash(bytes(h)) for h in meta["hashes"]]
        tokens = [tuple(int(x) for x in t) for t in meta["tokens"]]
        dtype = _DTYPES[meta["dtype"]]
        shape = tuple(int(x) for x in meta["shape"])
    except (ValueError, KeyError, TypeError, msgpack.ExtraData) as e:
        raise BadTransfer(f"malformed block metadata: {e}") from None
    if len(hashes) != len(tokens) or (shape and shape[0] != len(hashes)):
        raise BadTransfer("block metadata is inconsistent (hashes, tokens and KV disagree)")
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if data.dtype != np.uint8 or data.size != expected:
        raise BadTransfer(f"KV payload has {data.size} bytes, expected {expected}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only object-store buffer: we only read it
        kv = torch.from_numpy(data).view(dtype).reshape(shape)
    return Exported(hashes, tokens, kv)
