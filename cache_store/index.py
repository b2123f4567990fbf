"""The cluster-wide metadata index in Redis: who holds which block, in which tier.

Keys (every key carries the hash tag `{service}`, so one deployment's keys
share a Redis Cluster slot and the Lua scripts may touch them together):

    pfx:{svc}:b:<hash hex>     HASH  worker -> "<generation>:<d|h|k>"  holders of one block (device,
                                     host, disk: the fastest tier the worker holds it in)
    pfx:{svc}:wb:<worker>      SET   hash hex published by that worker (for purges)
    pfx:{svc}:lease:<worker>   HASH  gen, heartbeat time, load gauges; PEXPIRE = lease TTL
    pfx:{svc}:gen:<worker>     INT   newest generation of that worker id (fencing)
    pfx:{svc}:workers          SET   every worker id ever registered
    pfx:{svc}:c:<owner>        HASH  monotonic counters (HINCRBY) of a worker, or of the router
                                     (owner `router`); names and formats: `counter_names`
    pfx:{svc}:service          HASH  service facts (model fingerprint, block size), msgpack values
    pfx:{svc}:copies           HASH  stored (block entries) and distinct (blocks with any entry), kept
                                     exact by the publish and purge scripts
    pfx:{svc}:top              ZSET  "<last block hex>:<tokens>:<tenant>" (`counter_names.PrefixKey`)
                                     -> hits of that cached prefix, counted by the router; capped
    pfx:{svc}:pinned           SET   hash hex of the last block of each prefix an operator pinned
    pfx:{svc}:history          STREAM  msgpack samples of cluster totals (the dashboard's chart), capped
    pfx:{svc}:secret:<name>    STRING  random bytes, created once (SET NX); never in `service`

Why generations: a worker that restarts under the same id gets a new
generation; entries tagged with an older one are ignored by `holders` and
purged, so a restarted worker never "resurrects" blocks it lost. Why leases:
an entry counts only while its worker's lease (heartbeat + TTL) is alive, so
a killed worker stops being routed to within the TTL even before anyone
cleans up. Nothing here ever scans `*`: every key is reached from an explicit
set.

Every call runs under a circuit breaker: after a connection failure, calls
fail fast with `IndexUnavailable` for `redis_retry_s`, so an outage costs a
request at most one bounded timeout, not one per call.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache_store.config import CacheConfig
from cache_store.counter_names import DEVICE, DISK, HOST, LeaseField, PrefixKey
from cache_store.errors import Fenced, IndexAuthError, IndexUnavailable
from cache_store.hashing import BlockHash

T = TypeVar("T")
Op = Literal["add", "move", "remove"]
TIER_CODE = {DEVICE: "d", HOST: "h", DISK: "k"}
_PURGE_CHUNK = 1000

# KEYS: block keys of a chain, in order. ARGV[1]: lease key prefix.
# Returns a flat list: worker, leading blocks held, device blocks among them, generation, disk blocks.
_HOLDERS_LUA = """
local lease_prefix = ARGV[1]
local run, dev, gen, disk = {}, {}, {}, {}
local live = nil
for i = 1, #KEYS do
  local entries = redis.call('HGETALL', KEYS[i])
  local next_live, n_next = {}, 0
  for j = 1, #entries, 2 do
    local w, v = entries[j], entries[j + 1]
    local g, t = string.match(v, '^(%d+):(%a)$')
    local ok = false
    if g then
      if i == 1 then
        ok = redis.call('HGET', lease_prefix .. w, 'gen') == g
        if ok then gen[w] = g; run[w] = 0; dev[w] = 0; disk[w] = 0 end
      else
        ok = live[w] == true and gen[w] == g
      end
    end
    if ok then
      run[w] = i
      if t == 'd' then dev[w] = dev[w] + 1 elseif t == 'k' then disk[w] = disk[w] + 1 end
      next_live[w] = true
      n_next = n_next + 1
    end
  end
  live = next_live
  if n_next == 0 then break end
end
local out = {}
for w, r in pairs(run) do
  if r > 0 then
    out[#out + 1] = w; out[#out + 1] = r; out[#out + 1] = dev[w]; out[#out + 1] = tonumber(gen[w])
    out[#out + 1] = disk[w]
  end
end
return out
"""

# KEYS: lease, gen counter, workers set. ARGV: worker, gen, ttl ms, field, value, ...
# Returns -1 if a newer generation owns the id, else 1 if the lease existed, 0 if it had lapsed.
_HEARTBEAT_LUA = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = tonumber(ARGV[2])
if cur > mine then return -1 end
if cur < mine then redis.call('SET', KEYS[2], ARGV[2]) end
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[2], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return existed
"""


# KEYS: worker's purge set, copies hash, then one block key per event. ARGV: worker, then per event
# op ("add" | "remove"), value, hash hex. Keeps `stored` / `distinct` exact in the same atomic step.
_PUBLISH_LUA = """
local worker = ARGV[1]
local stored, distinct = 0, 0
for i = 3, #KEYS do
  local a = 2 + (i - 3) * 3
  local op, value, hex = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  if op == 'remove' then
    if redis.call('HDEL', KEYS[i], worker) == 1 then
      stored = stored - 1
      if redis.call('EXISTS', KEYS[i]) == 0 then distinct = distinct - 1 end
    end
    redis.call('SREM', KEYS[1], hex)
  else
    if redis.call('HSET', KEYS[i], worker, value) == 1 then
      stored = stored + 1
      if redis.call('HLEN', KEYS[i]) == 1 then distinct = distinct + 1 end
    end
    redis.call('SADD', KEYS[1], hex)
  end
end
if stored ~= 0 then redis.call('HINCRBY', KEYS[2], 'stored', stored) end
if distinct ~= 0 then redis.call('HINCRBY', KEYS[2], 'distinct', distinct) end
return stored
"""


class BlockCounts(NamedTuple):
    """Cluster-wide: block copies held (`stored`) and different blocks among them (`distinct`)."""

    stored: int
    distinct: int

    @property
    def duplicates(self) -> int:
        return self.stored - self.distinct


class Holding(NamedTuple):
    """One live worker's hold on a chain: its leading run of blocks, how many are on device, and how
    many on disk only (the run's tail: tiers never get faster down a chain); the rest are on host."""

    worker_id: str
    blocks: int
    device_blocks: int
    generation: int
    disk_blocks: int = 0


class Lease(NamedTuple):
    worker_id: str
    generation: int
    ttl_s: float  # time left
    fields: dict[str, str]


class HeartbeatReply(NamedTuple):
    lease_was_missing: bool  # the lease had lapsed (outage or Redis restart): republish


def holder_entry(generation: int, tier: str) -> str:
    """A worker's entry in a block's holders hash: "<generation>:<d|h>" (the Lua scripts parse it too)."""
    return f"{generation}:{TIER_CODE[tier]}"


def entry_generation(entry: str) -> int | None:
    """The worker generation a holder entry was written by (None for a malformed entry)."""
    generation = entry.partition(":")[0]
    return int(generation) if generation.isdigit() else None


def redact(url: str) -> str:
    """The URL with any password replaced by '***' (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


class MetadataIndex:
    """Redis-backed index of block holders, worker leases and counters. Thread-safe."""

    def __init__(self, url: str, config: CacheConfig | None = None):
        self.config = config or CacheConfig()
        self.url = url
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=self.config.redis_timeout_s,
                socket_connect_timeout=self.config.redis_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as e:
            raise ValueError(
                f"bad Redis URL {redact(url)!r}: {e}; use redis://[:password@]host:port[/db] or rediss:// for TLS"
            ) from None
        svc = self.config.service
        self._p = f"pfx:{{{svc}}}:"
        self._holders = self._r.register_script(_HOLDERS_LUA)
        self._heartbeat = self._r.register_script(_HEARTBEAT_LUA)
        self._publish = self._r.register_script(_PUBLISH_LUA)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._last_error = ""

    # ---- keys ------------------------------------------------------------

    def _block_key(self, h: BlockHash) -> str:
        return f"{self._p}b:{h.hex()}"

    def _k(self, kind: str, worker: str | None = None) -> str:
        return f"{self._p}{kind}" if worker is None else f"{self._p}{kind}:{worker}"

    # ---- circuit breaker ---------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the breaker is open (a recent call failed)."""
        with self._lock:
            return time.monotonic() >= self._down_until

    @property
    def last_error(self) -> str:
        return self._last_error

    def _call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            wait = self._down_until - time.monotonic()
        if wait > 0:
            raise IndexUnavailable(
                f"Redis at {redact(self.url)} is unreachable ({self._last_error}); next try in {wait:.1f}s"
            )
        try:
            result = fn()
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as e:
            raise self._trip(
                IndexAuthError,
                f"Redis at {redact(self.url)} refused the credentials: {e}; "
                "put the right password in the URL (redis://:PASSWORD@host:port)",
                e,
            ) from None
        except redis.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                raise self._trip(
                    IndexAuthError,
                    f"Redis at {redact(self.url)} needs a password: {e}; use redis://:PASSWORD@host:port",
                    e,
                ) from None
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise self._trip(IndexUnavailable, f"Redis at {redact(self.url)} is unreachable: {e}", e) from None
        with self._lock:
            self._down_until = 0.0
        return result

    def _trip(self, cls: type[IndexUnavailable], message: str, cause: Exception) -> IndexUnavailable:
        with self._lock:
            self._down_until = time.monotonic() + self.config.redis_retry_s
            self._last_error = f"{type(cause).__name__}: {cause}"
        return cls(message)

    def ping(self) -> None:
        """Raise IndexUnavailable / IndexAuthError unless Redis answers now (ignores the breaker)."""
        with self._lock:
            self._down_until = 0.0
        self._call(self._r.ping)

    def close(self) -> None:
        self._r.close()

    # ---- blocks ----------------------------------------------------------

    def holders(self, chain: Sequence[BlockHash]) -> list[Holding]:
        """For every live worker, the leading run of `chain` it holds, in ONE round trip.

        Sorted by blocks held, most first. Entries of dead (lease expired) or
        superseded (older generation) workers are ignored.
        """
        if not chain:
            return []
        keys = [self._block_key(h) for h in chain]
        flat = self._call(lambda: self._holders(keys=keys, args=[self._k("lease") + ":"]))
        out = [
            Holding(_s(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]), int(flat[i + 4]))
            for i in range(0, len(flat), 5)
        ]
        return sorted(out, key=lambda h: (-h.blocks, -h.device_blocks, h.worker_id))

    def holder_counts(self, hashes: Sequence[BlockHash]) -> dict[BlockHash, int]:
        """How many workers have an entry for each block, in ONE pipelined round trip (HLEN each).

        For duplicates-first eviction, which needs "is this a copy", not who is alive: an entry of a
        worker whose lease just lapsed still counts until it is reaped, which can only make a block
        look like a copy for that long.
        """
        if not hashes:
            return {}

        def run() -> list:
            pipe = self._r.pipeline(transaction=False)
            for h in hashes:
                pipe.hlen(self._block_key(h))
            return pipe.execute()

        return {h: int(n) for h, n in zip(hashes, self._call(run))}

    def publish(self, worker_id: str, generation: int, events: Sequence[tuple[Op, BlockHash, str]]) -> None:
        """Apply a batch of (op, hash, tier) changes of one worker in one atomic script call."""
        if not events:
            return
        keys = [self._k("wb", worker_id), self._k("copies")]
        args: list[str] = [worker_id]
        for op, h, tier in events:
            keys.append(self._block_key(h))
            value = "" if op == "remove" else holder_entry(generation, tier)
            args += ["remove" if op == "remove" else "add", value, h.hex()]
        self._call(lambda: self._publish(keys=keys, args=args))

    def replace_blocks(self, worker_id: str, generation: int, blocks: Iterable[tuple[BlockHash, str]]) -> None:
        """Make the index hold exactly `blocks` for this worker (after an outage or a restart)."""
        self.purge_worker(worker_id)
        batch: list[tuple[Op, BlockHash, str]] = []
        for h, tier in blocks:
            batch.append(("add", h, tier))
            if len(batch) >= _PURGE_CHUNK:
                self.publish(worker_id, generation, batch)
                batch = []
        self.publish(worker_id, generation, batch)

    def purge_worker(self, worker_id: str) -> int:
        """Delete every block entry of this worker id (any generation). Returns entries removed."""
        wb = self._k("wb", worker_id)

        def run() -> int:
            removed = 0
            cursor = 0
            while True:
                # SSCAN over this worker's own set, never over the keyspace.
                cursor, members = self._r.sscan(wb, cursor=cursor, count=_PURGE_CHUNK)
                if members:
                    hexes = [_s(hx) for hx in members]
                    keys = [wb, self._k("copies")] + [f"{self._p}b:{hx}" for hx in hexes]
                    args = [worker_id] + [x for hx in hexes for x in ("remove", "", hx)]
                    removed -= int(self._publish(keys=keys, args=args))
                if cursor == 0:
                    break
            self._r.delete(wb)
            return removed

        return self._call(run)

    # ---- workers ---------------------------------------------------------

    def register(self, worker_id: str, fields: Mapping[str, object] | None = None) -> int:
        """Start a new generation of `worker_id`: purge its old entries, take the lease."""
        gen = int(self._call(lambda: self._r.incr(self._k("gen", worker_id))))
        self.purge_worker(worker_id)
        self.heartbeat(worker_id, gen, fields or {})
        return gen

    def heartbeat(
        self,
        worker_id: str,
        generation: int,
        fields: Mapping[str, object],
        counter_deltas: Mapping[str, int] | None = None,
    ) -> HeartbeatReply:
        """Renew the lease (with load gauges in `fields`) and add counter deltas, in one round trip.

        Raises Fenced if a newer generation of this id registered since.
        """
        args: list[object] = [
            worker_id,
            generation,
            int(self.config.lease_ttl_s * 1000),
            LeaseField.HEARTBEAT,
            f"{time.time():.3f}",
        ]
        for k, v in fields.items():
            args += [k, str(v)]
        keys = [self._k("lease", worker_id), self._k("gen", worker_id), self._k("workers")]

        def run() -> list:
            pipe = self._r.pipeline(transaction=False)
            self._heartbeat(keys=keys, args=args, client=pipe)
            for name, delta in (counter_deltas or {}).items():
                pipe.hincrby(self._k("c", worker_id), name, delta)
            return pipe.execute()

        status = int(self._call(run)[0])
        if status < 0:
            raise Fenced(f"worker {worker_id} generation {generation} was superseded by a newer one")
        return HeartbeatReply(lease_was_missing=status == 0)

    def deregister(self, worker_id: str, generation: int) -> None:
        """Graceful exit: drop the lease and every entry (a newer generation's lease is left alone)."""
        lease = self._k("lease", worker_id)
        current = self._call(lambda: self._r.hget(lease, "gen"))
        if current is not None and int(current) != generation:
            return
        self.purge_worker(worker_id)
        self._call(lambda: self._r.delete(lease))

    def workers(self) -> list[str]:
        """Every worker id ever registered in this service."""
        return sorted(_s(w) for w in self._call(lambda: self._r.smembers(self._k("workers"))))

    def leases(self) -> dict[str, Lease]:
        """Live leases by worker id (a worker without one is dead or not started)."""
        ids = self.workers()

        def run() -> list:
            pipe = self._r.pipeline(transaction=False)
            for w in ids:
                pipe.hgetall(self._k("lease", w))
                pipe.pttl(self._k("lease", w))
            return pipe.execute()

        replies = self._call(run)
        out: dict[str, Lease] = {}
        for i, w in enumerate(ids):
            fields, pttl = replies[2 * i], replies[2 * i + 1]
            if fields and pttl and pttl > 0:
                decoded = {_s(k): _s(v) for k, v in fields.items()}
                out[w] = Lease(w, int(decoded.get("gen", 0)), pttl / 1000.0, decoded)
        return out

    def reap_dead(self) -> list[str]:
        """Purge the block entries of every registered worker whose lease expired."""
        live = self.leases()
        dead = [w for w in self.workers() if w not in live]
        for w in dead:
            self.purge_worker(w)
        return dead

    # ---- counters and service facts ----------------------------------------

    def counters(self, worker_ids: Iterable[str] | None = None) -> dict[str, dict[str, int]]:
        ids = list(worker_ids) if worker_ids is not None else self.workers()

        def run() -> list:
            pipe = self._r.pipeline(transaction=False)
            for w in ids:
                pipe.hgetall(self._k("c", w))
            return pipe.execute()

        return {w: {_s(k): int(v) for k, v in c.items()} for w, c in zip(ids, self._call(run))}

    def add_counters(self, owner: str, deltas: Mapping[str, int]) -> None:
        """HINCRBY counters of a non-worker owner (e.g. the router) in one round trip."""
        if not deltas:
            return

        def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for name, delta in deltas.items():
                pipe.hincrby(self._k("c", owner), name, delta)
            pipe.execute()

        self._call(run)

    def record_prefixes(self, hits: Mapping[str, int], keep: int = 500) -> None:
        """Add hit counts of cached prefixes (members: `PrefixKey.member()`), keep the top `keep`."""
        if not hits:
            return
        key = self._k("top")

        def run() -> None:
            pipe = self._r.pipeline(transaction=False)
            for member, n in hits.items():
                pipe.zincrby(key, n, member)
            pipe.zremrangebyrank(key, 0, -(keep + 1))
            pipe.execute()

        self._call(run)

    def top_prefixes(self, n: int = 20) -> list[tuple[str, int, str, int]]:
        """Most-hit prefixes: (last block hex, tokens, tenant label, hits)."""
        rows = self._call(lambda: self._r.zrevrange(self._k("top"), 0, n - 1, withscores=True))
        return [(*PrefixKey.parse(_s(member)), int(score)) for member, score in rows]

    def set_pinned(self, hashes: Iterable[BlockHash], pinned: bool) -> None:
        """Mark prefixes (by their last block) as pinned by an operator, for the dashboard."""
        members = [h.hex() for h in hashes]
        if members:
            fn = self._r.sadd if pinned else self._r.srem
            self._call(lambda: fn(self._k("pinned"), *members))

    def pinned(self) -> set[str]:
        return {_s(x) for x in self._call(lambda: self._r.smembers(self._k("pinned")))}

    def holders_of(self, hexes: Sequence[str]) -> dict[str, dict[str, str]]:
        """Raw holder entries of several blocks, by hex, in one round trip."""

        def run() -> list:
            pipe = self._r.pipeline(transaction=False)
            for hx in hexes:
                pipe.hgetall(f"{self._p}b:{hx}")
            return pipe.execute()

        return {hx: {_s(k): _s(v) for k, v in e.items()} for hx, e in zip(hexes, self._call(run))}

    def append_history(self, sample: Mapping[str, float], maxlen: int = 4320) -> None:
        """Append a cluster sample (msgpack) to a capped stream: the dashboard's chart history."""
        self._call(
            lambda: self._r.xadd(
                self._k("history"), {"s": msgpack.packb(dict(sample))}, maxlen=maxlen, approximate=True
            )
        )

    def history(self, n: int = 720) -> list[dict[str, float]]:
        rows = self._call(lambda: self._r.xrevrange(self._k("history"), count=n))
        return [msgpack.unpackb(fields[b"s"] if b"s" in fields else fields["s"]) for _, fields in reversed(rows)]

    def secret(self, name: str, nbytes: int = 32) -> bytes:
        """A per-service random secret, created once (SET NX) and kept apart from service info so
        it is never shown (used to derive tenant cache salts)."""
        key = self._k("secret", name)
        self._call(lambda: self._r.set(key, os.urandom(nbytes), nx=True))
        return bytes(self._call(lambda: self._r.get(key)))

    def set_service_info(self, info: Mapping[str, object]) -> None:
        packed = {k: msgpack.packb(v) for k, v in info.items()}
        self._call(lambda: self._r.hset(self._k("service"), mapping=packed))

    def service_info(self) -> dict[str, object]:
        raw = self._call(lambda: self._r.hgetall(self._k("service")))
        return {_s(k): msgpack.unpackb(v) for k, v in raw.items()}

    def block_counts(self) -> BlockCounts:
        """Block copies and distinct blocks cluster-wide (dead workers' entries count until reaped)."""
        raw = self._call(lambda: self._r.hmget(self._k("copies"), "stored", "distinct"))
        return BlockCounts(*(int(x or 0) for x in raw))

    def block_entries(self, h: BlockHash) -> dict[str, str]:
        """Raw holder entries of one block (for tests and the dashboard)."""
        raw = self._call(lambda: self._r.hgetall(self._block_key(h)))
        return {_s(k): _s(v) for k, v in raw.items()}


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
