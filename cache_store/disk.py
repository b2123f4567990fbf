"""The disk tier: KV blocks in a few large preallocated slab files, written off the engine thread.

Layout. A worker's directory holds `LOCK` (an flock: one process per directory) and slab files
`slab-000.pkv`, `slab-001.pkv`, ... of up to `SLAB_BYTES` each, preallocated at start so that a
filesystem filling up later can never fail a write, and so that the tier's bytes on disk are
exactly its budget. A slab is an array of fixed-size slots; slot `i` of the tier is slot
`i % slots_per_slab` of slab `i // slots_per_slab`. One slot holds one block:

    offset 0             header (HEADER.size bytes, then the token ids), zero-padded to `header_bytes`
    offset header_bytes  payload: the block's KV, [layers, 2, kv_heads, block_size, head_dim] in the
                         model's dtype, zero-padded to `payload_bytes`
    (both rounded up to 4 KiB, so every payload starts on a page boundary)

    header, little-endian:
      magic        8s   b"PFXKVSL\\0"
      version      u32  FORMAT_VERSION: another version is ignored (and its slot reused)
      flags        u32  bit 0: the block has a parent (else it is a prompt's first block)
      fingerprint  16s  BLAKE2b of the model fingerprint and the KV shape: another model's slots
                        are ignored and reused, never served
      block hash   16s  the chained BlockHash (hashing.py)
      parent hash  16s  zeros for a first block
      seq          u64  write sequence number: of two slots naming one block, the newest wins
      payload len  u64  must equal the KV shape's block bytes
      n tokens     u32  must equal the block size
      reserved     u32
      payload hash u64  xxh3-64 of the payload bytes
      token ids    n * u32                      the collision check, as in the tree
      header hash  u64  xxh3-64 of every header byte before it

A slot is valid only if its header hash matches; its payload is served only if the payload hash
matches too. So a torn write (SIGKILL or power loss in the middle of a slot), a flipped bit or
a slot of another model is a miss, counted (`disk_corrupt_slots`), never wrong KV. xxh3 runs at
~14 GB/s on this project's CPU (zlib.crc32 at 2.2 GB/s would bound a fast NVMe read).

Writes. `submit` only queues (the caller copied the payload already); one writer thread writes
each run of consecutive slots with one `pwritev`. The queue is bounded in bytes: when the disk
is slow, `submit` refuses and the caller counts a dropped write; nothing ever waits on the disk
but the writer. When its queue is empty the writer asks `refill` for more (the store's
write-behind backlog). A slot whose write has not finished is PENDING: reads of it are served
from the queued copy, and freeing it defers the free until the write is done (a slot is never
handed out twice).

Reads. `read_into` reads a run of consecutive slots with one `preadv` (headers into scratch,
payloads straight into the destination memory, e.g. host-tier slots), then checks each slot.

Recovery. `recover` reads every slot's header (not the payloads) and returns the valid ones of
this model; the store rebuilds its prefix tree from them and frees the rest. The operator's pins
(`pin_prefix`) are kept beside the slabs in `pins.json` (each pin's last block hash and count,
with the tier fingerprint), rewritten whole (write, fsync, rename) when a pin changes; after a
restart the store pins those prefixes again where their blocks were recovered.

Files are created 0600 (directory 0700), opened with O_NOFOLLOW, only under the given directory.
No torch import at module level is needed by readers of this docstring; the tier moves torch
tensors as raw bytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash

from cache_store import counter_names as cn
from cache_store.counters import Counters
from cache_store.errors import ConfigError
from cache_store.hashing import HASH_BYTES, BlockHash
from cache_store.kv_pool import KVShape

log = logging.getLogger(__name__)

MAGIC = b"PFXKVSL\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sII16s16s16sQQIIQ")  # magic .. payload hash; token ids and header hash follow
_HASH = struct.Struct("<Q")
PAGE = 4096
SLAB_BYTES = 1 << 30  # a slab file is at most this big: a few files, never one per block
QUEUE_BYTES = 64 << 20  # payload bytes queued for the writer at most (then writes are dropped)
LOCK_NAME = "LOCK"
PINS_NAME = "pins.json"
PROBE_BLOCKS = 32  # slots timed at start-up (1 and this many) to measure the read cost
_NO_PARENT = bytes(HASH_BYTES)
_PROBE_FP = b"prefixcache-probe"[:16]
assert HASH_BYTES == 16, "the slot header stores 16-byte block hashes"

FREE, VALID, PENDING, ZOMBIE = 0, 1, 2, 3  # slot states; ZOMBIE: freed while its write was pending


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def tier_fingerprint(model_fingerprint: str, shape: KVShape) -> bytes:
    """16 bytes naming whose KV a slot holds: the model fingerprint and the exact KV shape."""
    desc = f"{model_fingerprint}|{shape.layers}|{shape.kv_heads}|{shape.block_size}|{shape.head_dim}|{shape.dtype}"
    return hashlib.blake2b(desc.encode(), digest_size=16).digest()


class SlotHeader(NamedTuple):
    """What a slot says it holds (recovery reads only these)."""

    slot: int
    hash: BlockHash
    parent: BlockHash | None
    tokens: tuple[int, ...]
    seq: int


class WriteItem(NamedTuple):
    """One block to write: `payload` is a contiguous CPU tensor the writer owns from now on."""

    slot: int
    hash: BlockHash
    parent: BlockHash | None
    tokens: tuple[int, ...]
    payload: torch.Tensor


class Layout(NamedTuple):
    """Sizes of one slot for one KV shape (see the module docstring)."""

    header_bytes: int
    payload_bytes: int  # padded
    block_bytes: int  # unpadded payload length
    block_size: int

    @property
    def stride(self) -> int:
        return self.header_bytes + self.payload_bytes

    @classmethod
    def of(cls, shape: KVShape) -> Layout:
        header = HEADER.size + 4 * shape.block_size + _HASH.size
        return cls(_round_up(header), _round_up(shape.block_bytes), shape.block_bytes, shape.block_size)


def encode_header(layout: Layout, fp: bytes, item: WriteItem, seq: int, payload_hash: int) -> bytes:
    flags = 1 if item.parent is not None else 0
    head = HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        flags,
        fp,
        bytes(item.hash),
        bytes(item.parent) if item.parent is not None else _NO_PARENT,
        seq,
        layout.block_bytes,
        len(item.tokens),
        0,
        payload_hash,
    )
    head += struct.pack(f"<{len(item.tokens)}I", *item.tokens)
    head += _HASH.pack(xxhash.xxh3_64_intdigest(head))
    return head.ljust(layout.header_bytes, b"\0")


def decode_header(layout: Layout, fp: bytes, raw: bytes | memoryview, slot: int) -> tuple[SlotHeader, int] | None:
    """(header, payload hash) of a slot of this model and format, or None (torn, foreign, empty)."""
    magic, version, flags, their_fp, h, parent, seq, plen, ntok, _, phash = HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version != FORMAT_VERSION or their_fp != fp:
        return None
    if plen != layout.block_bytes or ntok != layout.block_size:
        return None
    end = HEADER.size + 4 * ntok
    if end + _HASH.size > len(raw) or _HASH.unpack_from(raw, end)[0] != xxhash.xxh3_64_intdigest(raw[:end]):
        return None
    tokens = struct.unpack_from(f"<{ntok}I", raw, HEADER.size)
    head = SlotHeader(slot, BlockHash(bytes(h)), BlockHash(bytes(parent)) if flags & 1 else None, tokens, seq)
    return head, phash


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy (any dtype, bfloat16 too)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("disk I/O needs a contiguous CPU tensor")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class DiskStats(NamedTuple):
    slots: int  # in use (a block on disk only, or the disk copy of a block in a faster tier)
    capacity: int
    bytes_used: int
    bytes_capacity: int
    pending: int  # writes queued
    slot_bytes: int


class DiskTier:
    """Slab files + slot allocator + writer thread. Thread-safe; the store serializes the tree."""

    def __init__(
        self,
        directory: str | os.PathLike,
        capacity_bytes: int,
        shape: KVShape,
        model_fingerprint: str,
        *,
        counters: Counters | None = None,
        queue_bytes: int = QUEUE_BYTES,
        slab_bytes: int = SLAB_BYTES,
    ):
        self.dir = Path(directory)
        self.layout = Layout.of(shape)
        self.shape = shape
        self.fp = tier_fingerprint(model_fingerprint, shape)
        self.counters = counters or Counters()
        self.queue_bytes = queue_bytes
        stride = self.layout.stride
        wanted = capacity_bytes // stride
        if wanted < 1:
            raise ConfigError(
                f"disk cache of {capacity_bytes} bytes holds no block ({stride} bytes per slot with its header); "
                f"give at least {stride} bytes"
            )
        self.slots_per_slab = max(1, slab_bytes // stride)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._lockfile = self._take_directory()
        try:
            self._fds: list[int] = []
            self.capacity = self._open_slabs(wanted)
        except BaseException:
            self._close_files()
            raise
        self._state = bytearray(self.capacity)
        self._hash: list[BlockHash | None] = [None] * self.capacity
        self._free_count = self.capacity
        self._cursor = 0
        self._queue: list[WriteItem] = []
        self._queued_bytes = 0
        self._pending: dict[int, torch.Tensor] = {}  # slot -> payload, until its write is done
        self._failed: list[tuple[int, BlockHash]] = []  # not yet taken by the store
        self._failed_slots: set[int] = set()  # writes that failed, until the store frees the slot
        self._seq = 1
        self._closing = False
        self.refill: Callable[[], None] | None = None  # the store's write-behind pump (writer thread)
        self._zero = bytes(max(self.layout.payload_bytes - self.layout.block_bytes, 0))
        self._writer = threading.Thread(target=self._write_loop, name=f"disk-writer-{self.dir.name}", daemon=True)
        self._writer.start()

    # ---- files ------------------------------------------------------------

    def _take_directory(self) -> int:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"disk cache directory {str(self.dir)!r} cannot be created: {e}") from None
        if self.dir.is_symlink() or not self.dir.is_dir():
            raise ConfigError(f"disk cache directory {str(self.dir)!r} is not a directory")
        fd = self._open(LOCK_NAME)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                f"disk cache directory {str(self.dir)!r} is in use by another process (pid {owner or '?'}); "
                "give each worker its own directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self, name: str) -> int:
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.fchmod(fd, 0o600)  # a file left by an older run with a wider mode is narrowed
        return fd

    def _open_slabs(self, wanted: int) -> int:
        """Create, resize and preallocate the slab files for `wanted` slots; returns the slots the
        filesystem had room for (a full filesystem shrinks the tier, with a warning, instead of
        failing writes later). Slab files beyond the new size are removed."""
        stride, per = self.layout.stride, self.slots_per_slab
        have = 0
        n_slabs = -(-wanted // per)
        for i in range(n_slabs):
            slots = min(per, wanted - i * per)
            fd = self._open(slab_name(i))
            self._fds.append(fd)
            got = _preallocate(fd, slots, stride)
            have += got
            if got < slots:
                log.warning(
                    "disk cache %s: asked for %d slots (%.2f GB), the filesystem had room for %d (%.2f GB)",
                    self.dir,
                    wanted,
                    wanted * stride / 1e9,
                    have,
                    have * stride / 1e9,
                )
                if got == 0:
                    os.close(self._fds.pop())
                    os.unlink(self.dir / slab_name(i))
                break
        for extra in sorted(self.dir.glob("slab-*.pkv")):
            if _slab_index(extra.name) is not None and _slab_index(extra.name) >= len(self._fds):
                extra.unlink()
        if have == 0:
            raise ConfigError(f"disk cache directory {str(self.dir)!r} has no room for one slot of {stride} bytes")
        return have

    def _where(self, slot: int) -> tuple[int, int]:
        return self._fds[slot // self.slots_per_slab], (slot % self.slots_per_slab) * self.layout.stride

    # ---- slots ------------------------------------------------------------

    @property
    def free_count(self) -> int:
        return self._free_count

    @property
    def used_count(self) -> int:
        return self.capacity - self._free_count

    def alloc(self, n: int) -> list[int]:
        """Up to n free slots, ascending from a rotating cursor, so blocks written together (a
        chain) land in consecutive slots and are read back with one syscall."""
        with self._lock:
            out: list[int] = []
            state = self._state
            while len(out) < n and self._free_count:
                i = state.find(FREE, self._cursor)
                if i < 0:
                    i = state.find(FREE, 0)
                state[i] = PENDING  # reserved; `submit` queues its write, `free` gives it back
                self._free_count -= 1
                out.append(i)
                self._cursor = i + 1 if i + 1 < self.capacity else 0
            return out

    def free(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                st = self._state[s]
                if st == FREE or st == ZOMBIE:
                    raise RuntimeError(f"double free of disk slot {s}")
                if st == PENDING and s in self._pending and s not in self._failed_slots:
                    self._state[s] = ZOMBIE  # its write is in flight: free it when that is done
                    continue
                self._release(s)

    def erase(self, slots: Sequence[int]) -> None:
        """Blank the headers of these free slots, so that a restart does not find their blocks again
        (what `TieredStore.clear` forgets stays forgotten). Slots in use or with a write in flight
        are left alone: the caller flushes the writer first."""
        blank = bytes(self.layout.header_bytes)
        with self._lock:
            todo = [s for s in slots if self._state[s] == FREE]
            for s in todo:  # under the lock: none of them can be handed out and written meanwhile
                fd, off = self._where(s)
                try:
                    os.pwrite(fd, blank, off)
                except OSError as e:  # the slot stays findable: valid KV of its block, never wrong
                    log.warning("disk cache: could not blank slot %d: %s", s, e)

    def _release(self, s: int) -> None:
        self._state[s] = FREE
        self._hash[s] = None
        self._pending.pop(s, None)
        self._failed_slots.discard(s)
        self._free_count += 1

    def is_pending(self, slot: int) -> bool:
        with self._lock:
            return slot in self._pending and slot not in self._failed_slots

    def zombie_count(self) -> int:
        """Slots freed while their write was in flight (free again once it lands)."""
        with self._lock:
            return self._state.count(ZOMBIE)

    # ---- writes -----------------------------------------------------------

    def queue_room(self) -> int:
        """Blocks `submit` would accept now."""
        with self._lock:
            if self._closing:
                return 0
            return max(0, (self.queue_bytes - self._queued_bytes) // self.layout.block_bytes)

    def submit(self, items: Sequence[WriteItem]) -> int:
        """Queue writes of reserved slots (from `alloc`); returns how many leading items were taken.
        The rest were refused (queue full): the caller frees their slots and counts the drop."""
        taken = 0
        with self._lock:
            for it in items:
                if self._closing or self._queued_bytes + self.layout.block_bytes > self.queue_bytes:
                    break
                if self._state[it.slot] != PENDING or it.slot in self._pending:
                    raise RuntimeError(f"disk slot {it.slot} was not reserved for this write")
                self._queue.append(it)
                self._pending[it.slot] = it.payload
                self._hash[it.slot] = it.hash
                self._queued_bytes += self.layout.block_bytes
                taken += 1
            if taken:
                self._wake.notify()
        return taken

    def wake(self) -> None:
        """The store has backlog: let an idle writer ask for it."""
        with self._lock:
            self._wake.notify()

    def take_failures(self) -> list[tuple[int, BlockHash]]:
        """Writes that failed (I/O error): (slot, hash). The store drops those copies, then frees
        the slots; until then reads of them are served from the queued copy."""
        with self._lock:
            out, self._failed = self._failed, []
            return [(s, h) for s, h in out if s in self._failed_slots]

    def retry_failure(self, slot: int, h: BlockHash) -> None:
        """Give a failure back (the store could not act on it yet): the next take returns it."""
        with self._lock:
            if slot in self._failed_slots:
                self._failed.append((slot, h))

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._closing:
                    self._wake.wait(timeout=0.05)
                if not self._queue and self._closing:
                    return
                batch, self._queue = self._queue, []
            if not batch:
                refill = self.refill
                if refill is not None:
                    try:
                        refill()
                    except Exception:  # a bug in the pump must not kill the writer
                        log.exception("disk write-behind refill failed")
                continue
            self._write_batch(batch)

    def _write_batch(self, batch: list[WriteItem]) -> None:
        batch.sort(key=lambda it: it.slot)
        t0 = time.perf_counter()
        ok: list[WriteItem] = []
        bad: list[WriteItem] = []
        for run in _runs(batch, key=lambda it: it.slot, limit=self._per_call(), per_slab=self.slots_per_slab):
            with self._lock:
                seqs = range(self._seq, self._seq + len(run))
                self._seq += len(run)
            iov: list = []
            for it, seq in zip(run, seqs):
                data = byte_view(it.payload)
                iov.append(encode_header(self.layout, self.fp, it, seq, xxhash.xxh3_64_intdigest(data)))
                iov.append(data)
                if self._zero:
                    iov.append(self._zero)
            fd, off = self._where(run[0].slot)
            try:
                _pwritev_all(fd, iov, off)
                ok += run
            except OSError as e:
                log.warning("disk cache write of %d blocks failed: %s", len(run), e)
                bad += run
        dt = time.perf_counter() - t0
        with self._lock:
            for it in ok:
                self._done(it)
            for it in bad:
                self._queued_bytes -= self.layout.block_bytes
                if self._state[it.slot] == ZOMBIE:
                    self._release(it.slot)  # freed meanwhile: nobody needs to hear of it
                else:
                    self._failed.append((it.slot, it.hash))
                    self._failed_slots.add(it.slot)
        self.counters.add_many(
            {
                cn.DISK_WRITTEN_BLOCKS: len(ok),
                cn.DISK_WRITE_BYTES: len(ok) * self.layout.block_bytes,
                cn.DISK_WRITE_US: int(dt * 1e6),
                cn.DISK_WRITE_ERRORS: len(bad),
            }
        )

    def _done(self, it: WriteItem) -> None:
        """(Lock held.) A write landed: the slot is VALID, or free if it was freed meanwhile."""
        self._queued_bytes -= self.layout.block_bytes
        if self._state[it.slot] == ZOMBIE:
            self._release(it.slot)
        else:
            self._state[it.slot] = VALID
            self._pending.pop(it.slot, None)

    def _per_call(self) -> int:
        """Slots per pwritev/preadv: IOV_MAX iovecs, 3 per slot at most."""
        try:
            iov_max = os.sysconf("SC_IOV_MAX")
        except (ValueError, OSError):
            iov_max = 1024
        return max(1, (iov_max if iov_max > 0 else 1024) // 3)

    def idle(self) -> bool:
        """No write queued or in flight (failed ones aside)."""
        with self._lock:
            return not self._queue and not self._pending.keys() - self._failed_slots

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the queue is written (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue and not self._pending.keys() - self._failed_slots:
                    return True
            time.sleep(0.005)
        return False

    # ---- reads ------------------------------------------------------------

    def read_into(self, slots: Sequence[int], hashes: Sequence[BlockHash], dests: Sequence[memoryview]) -> list[bool]:
        """Read each slot's payload into its destination (block bytes each); one preadv per run of
        consecutive slots. ok[i] is False when slot i's header or payload does not check out
        (torn, flipped, overwritten): that destination holds garbage and must not be used."""
        t0 = time.perf_counter()
        ok = [False] * len(slots)
        from_file: list[int] = []
        with self._lock:
            queued = {i: (self._pending.get(s), self._hash[s]) for i, s in enumerate(slots)}
        for i, (payload, held) in queued.items():
            if payload is not None and held == hashes[i]:
                dests[i][:] = byte_view(payload)
                ok[i] = True
            else:
                from_file.append(i)
        nbytes = 0
        order = sorted(from_file, key=lambda i: slots[i])
        for run in _runs(order, key=lambda i: slots[i], limit=self._per_call(), per_slab=self.slots_per_slab):
            heads = [bytearray(self.layout.header_bytes) for _ in run]
            pad = bytearray(len(self._zero))
            iov: list = []
            for i, head in zip(run, heads):
                iov += [head, dests[i]] + ([pad] if pad else [])
            fd, off = self._where(slots[run[0]])
            try:
                got = os.preadv(fd, iov, off)
            except OSError as e:
                log.warning("disk cache read of %d blocks failed: %s", len(run), e)
                continue
            nbytes += got
            for k, (i, head) in enumerate(zip(run, heads)):
                if got < (k + 1) * self.layout.stride - len(pad):
                    break  # short read: the rest are misses
                ok[i] = self._check(slots[i], hashes[i], head, dests[i])
        bad = len(slots) - sum(ok)
        self.counters.add_many(
            {
                cn.DISK_READ_BLOCKS: sum(ok),
                cn.DISK_READ_BYTES: nbytes,
                cn.DISK_READ_US: int((time.perf_counter() - t0) * 1e6),
                cn.DISK_CORRUPT_SLOTS: bad,
            }
        )
        return ok

    def _check(self, slot: int, want: BlockHash, head: bytearray, payload: memoryview) -> bool:
        digest = xxhash.xxh3_64_intdigest(payload)  # first: a miss costs what a hit costs (the probe times it)
        got = decode_header(self.layout, self.fp, head, slot)
        return got is not None and got[0].hash == want and digest == got[1]

    # ---- pins -------------------------------------------------------------

    def save_pins(self, pins: Sequence[tuple[BlockHash, int]]) -> None:
        """Replace the saved pins with `pins` ((last block hash, times pinned) each); atomic: a
        crash leaves the old file or the new one, never a torn one."""
        doc = {"fingerprint": self.fp.hex(), "pins": [[h.hex(), n] for h, n in pins]}
        tmp = f"{PINS_NAME}.tmp"
        fd = self._open(tmp)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(doc).encode(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.dir / tmp, self.dir / PINS_NAME)

    def load_pins(self) -> list[tuple[BlockHash, int]]:
        """The pins saved by `save_pins` for this model; [] when none, unreadable, or another model's."""
        try:
            fd = os.open(self.dir / PINS_NAME, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return []
        try:
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read())
            if doc.get("fingerprint") != self.fp.hex():
                return []
            return [(BlockHash(bytes.fromhex(h)), int(n)) for h, n in doc["pins"] if int(n) > 0]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("disk cache %s: saved pins ignored (%s)", self.dir, e)
            return []

    # ---- recovery ---------------------------------------------------------

    def recover(self) -> list[SlotHeader]:
        """Headers of every valid slot of this model (payloads are not read); those slots are now in
        use, the rest free. Of several slots naming one block, the newest write is kept."""
        found: dict[BlockHash, SlotHeader] = {}
        ignored = 0
        t0 = time.perf_counter()
        for slot in range(self.capacity):
            fd, off = self._where(slot)
            try:
                raw = os.pread(fd, self.layout.header_bytes, off)
            except OSError:
                ignored += 1
                continue
            if len(raw) < HEADER.size or raw[:8] != MAGIC:
                continue  # never written (zeros) or not ours: reused silently
            got = decode_header(self.layout, self.fp, raw, slot)
            if got is None:
                ignored += 1  # torn, other version or another model: reused
                continue
            head = got[0]
            old = found.get(head.hash)
            if old is None or head.seq > old.seq:
                found[head.hash] = head
        with self._lock:
            for head in found.values():
                self._state[head.slot] = VALID
                self._hash[head.slot] = head.hash
                self._free_count -= 1
            self._seq = max((h.seq for h in found.values()), default=0) + 1
        self.counters.add(cn.DISK_IGNORED_SLOTS, ignored)
        log.info("disk cache %s: %d blocks found in %.2fs", self.dir, len(found), time.perf_counter() - t0)
        return sorted(found.values(), key=lambda h: h.seq)

    # ---- cost -------------------------------------------------------------

    def time_read(self, rounds: int = 3) -> tuple[float, float]:
        """(seconds per block, seconds per read call) of reading runs of 1 and PROBE_BLOCKS blocks
        through `read_into`, from the device, not the page cache (flushed and dropped first):
        what a hit on a block written long ago costs. Uses free slots (written with probe
        content, freed again) or valid ones read as they are; never changes a valid slot."""
        n = min(PROBE_BLOCKS, self.capacity, self.slots_per_slab)
        slots = list(range(n))
        with self._lock:
            mine = [s for s in slots if self._state[s] == FREE]
            for s in mine:
                self._state[s] = PENDING
                self._free_count -= 1
        probe = torch.zeros(self.shape.block_dims, dtype=self.shape.dtype)
        byte_view(probe)[:] = os.urandom(self.layout.block_bytes)
        try:
            data = byte_view(probe)
            for s in mine:  # probe content under no model's fingerprint: recovery never serves it
                fd, off = self._where(s)
                item = WriteItem(s, BlockHash(bytes(HASH_BYTES)), None, (0,) * self.layout.block_size, probe)
                head = encode_header(self.layout, _PROBE_FP, item, 0, xxhash.xxh3_64_intdigest(data))
                _pwritev_all(fd, [head, data, self._zero] if self._zero else [head, data], off)
            fd, _ = self._where(0)
            os.fdatasync(fd)
            dests = [byte_view(torch.empty_like(probe)) for _ in slots]
            want = [BlockHash(bytes(HASH_BYTES))] * n
            best = {}
            quiet = Counters()  # the probe is not traffic: keep it out of the tier's counters
            real, self.counters = self.counters, quiet
            try:
                for k in sorted({1, n}):
                    best[k] = float("inf")
                    for _ in range(rounds):
                        _drop_cache(fd, 0, n * self.layout.stride)
                        t = time.perf_counter()
                        self.read_into(slots[:k], want[:k], dests[:k])
                        best[k] = min(best[k], time.perf_counter() - t)
            finally:
                self.counters = real
        finally:
            blank = bytes(self.layout.header_bytes)
            for s in mine:  # leave no probe header behind
                fd, off = self._where(s)
                os.pwrite(fd, blank, off)
            with self._lock:
                for s in mine:
                    self._release(s)
        if n == 1:
            return best[1], 0.0
        per_block = max(0.0, (best[n] - best[1]) / (n - 1))
        return per_block, max(0.0, best[1] - per_block)

    # ---- lifecycle --------------------------------------------------------

    def stats(self) -> DiskStats:
        with self._lock:
            used = self.capacity - self._free_count
            stride = self.layout.stride
            return DiskStats(used, self.capacity, used * stride, self.capacity * stride, len(self._pending), stride)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to `timeout_s`), sync the slabs, release the directory."""
        self.refill = None
        self.flush(timeout_s)
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._writer.join(timeout=timeout_s)
        for fd in self._fds:
            try:
                os.fdatasync(fd)
            except OSError:
                pass
        self._close_files()

    def _close_files(self) -> None:
        for fd in getattr(self, "_fds", []):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if getattr(self, "_lockfile", None) is not None:
            os.close(self._lockfile)  # releases the flock
            self._lockfile = None


def slab_name(i: int) -> str:
    return f"slab-{i:03d}.pkv"


def _slab_index(name: str) -> int | None:
    stem = name.removeprefix("slab-").removesuffix(".pkv")
    return int(stem) if stem.isdigit() else None


def _preallocate(fd: int, slots: int, stride: int) -> int:
    """Size a slab for `slots` slots and reserve its blocks; returns the slots it got (fewer when the
    filesystem is full; the file is then cut to whole slots)."""
    size = slots * stride
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)
    try:
        os.posix_fallocate(fd, 0, size)
        return slots
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG):
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: a sparse file
                os.ftruncate(fd, size)
                return slots
            raise
    st = os.fstatvfs(fd)
    room = os.fstat(fd).st_blocks * 512 + st.f_bavail * st.f_frsize
    fit = max(0, min(slots, room // stride - 1))  # one slot's worth of slack for metadata
    while fit > 0:
        try:
            os.ftruncate(fd, fit * stride)
            os.posix_fallocate(fd, 0, fit * stride)
            return fit
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            fit -= max(1, fit // 16)
    os.ftruncate(fd, 0)
    return 0


def _pwritev_all(fd: int, iov: list, offset: int) -> None:
    """pwritev until every byte is written (a short write goes on where it stopped)."""
    total = sum(len(b) for b in iov)
    done = os.pwritev(fd, iov, offset)
    while done < total:
        flat = b"".join(bytes(b) for b in iov)[done:]
        n = os.pwrite(fd, flat, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        done += n


def _drop_cache(fd: int, offset: int, length: int) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _runs(items: Sequence, *, key, limit: int, per_slab: int) -> list[list]:
    """Split items (sorted by key) into runs of consecutive keys within one slab, `limit` long at most."""
    runs: list[list] = []
    for it in items:
        k = key(it)
        if runs:
            last = runs[-1]
            prev = key(last[-1])
            if k == prev + 1 and k // per_slab == prev // per_slab and len(last) < limit:
                last.append(it)
                continue
        runs.append([it])
    return runs
