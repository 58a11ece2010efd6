"""``redis://`` and ``redis+cluster://``: a ledger in Redis or Redis Cluster, shared by many hosts.

URLs::

    redis://[[user]:password@]host[:port][/db][?option=value&...]
    rediss://...                                                   (TLS)
    redis+cluster://[[user]:password@]host:port[,host:port...][?option=value&...]
    rediss+cluster://...                                           (TLS)

A cluster URL names seed nodes; the others are found with ``CLUSTER SLOTS``. Options:
``prefix`` (of every key, default ``retrysafe``), ``timeout`` (seconds a command may take,
connecting included; default 2), and for TLS ``ssl_ca_certs`` (a CA bundle file),
``ssl_cert_reqs`` (``required``, the default, or ``none``) and ``ssl_certfile`` with
``ssl_keyfile`` (the client's certificate and key, PEM files, which a TLS Redis asks for unless
``tls-auth-clients`` is off; the key may be in the certificate's file).

**Layout.** One hash per record, key ``<prefix>:<rid in hex>``, fields ``state`` (0 in flight,
1 done, 2 not replayable), ``token`` (decimal), ``fingerprint``, ``lease_until``,
``expires_at``, ``created_at`` (the server's clock, decimal seconds), ``response`` and
``scope``. One key per record: every operation touches a single hash slot, so records spread
over every master of a cluster. Tokens (non-negative, as the engine's are) are compared as
strings, never as Lua numbers (doubles: 63-bit tokens would be rounded). Needs Redis 5.0 or
newer (7.0 for notified waiting on a cluster).

**One round trip per primitive.** claim, renew, complete, release, get and delete are each one
Lua script, run with ``EVALSHA``; on ``NOSCRIPT`` (a restarted server, ``SCRIPT FLUSH``, a
node that never saw it) the same call is sent again as ``EVAL``, which also caches it. Times
come from ``redis.call('TIME')`` inside the scripts, never from the client's clock.

**Expiry.** Every read judges expiry by ``expires_at`` against the server's time (contract rule
19). Each record also carries a native TTL (``PEXPIREAT``) set ``EXPIRY_GRACE`` seconds past
``expires_at``: Redis reclaims the memory by itself, with no sweeper needed, while the logical
expiry stays the one that counts. During the grace an expired record is still visible to
:meth:`RedisStore.stats` (as ``expired``) and :meth:`RedisStore.purge_expired` deletes it,
which gives those two the meaning they have for every other store. Leases and ttls longer
than ``MAX_SECONDS`` (about 31,700 years; infinity too) are cut to it. ``purge_expired`` is a
``SCAN`` sweep that resumes where the previous call stopped and looks at a bounded number of
keys per call, so the engine's periodic purge stays cheap on a large keyspace.

**Corrupt records** (a field missing or unreadable, a key that is not a hash) raise
:class:`CorruptRecord` with the record's token, which the engine releases. When the token
itself cannot be read the error carries ``UNREADABLE_TOKEN`` (-1, never a real token), and
``release(rid, -1)`` deletes the record only if its token is still unreadable: the key is never
stuck, and a sound record written since is never removed.

**Waiting** (:meth:`RedisStore.wait`) is notified through pub/sub: ``complete``, ``release``
and ``delete`` publish on a channel named like the record's key, inside their script. A
standalone server uses classic ``PUBLISH``/``SUBSCRIBE``. A cluster uses sharded pub/sub
(``SPUBLISH``/``SSUBSCRIBE``, Redis 7.0+): classic messages are broadcast over the cluster
bus to every node, sharded ones stay in the shard that owns the key's slot. On an older cluster
the script's ``SPUBLISH`` fails harmlessly (``pcall``) and waiting falls back to polling. One
subscriber connection per node and event loop serves every waiter; after subscribing, the
waiter reads the record once more, so a completion that landed before the subscription is not
missed, and it also wakes when the holder's lease ends (a dead holder sends no notice). If
subscribing fails, or is not confirmed within ``timeout`` (the subscriber connection is then
dropped and opened anew by the next waiter), :meth:`RedisStore.wait` polls
(``poll_interval``). It always returns by its timeout.

**Connections** are :mod:`retrysafe.stores._resp` connections, one per node and event loop,
shared by all concurrent operations (commands are pipelined). A connection found closed is
reopened on the next operation, so the store recovers by itself when the server comes back.
A store used from another event loop opens connections of its own there; one used in a child
process after ``fork()`` forgets the parent's connections (``os.register_at_fork``) and opens
its own. On a cluster, ``MOVED`` updates the slot map (refreshed in full on the next call)
and the command is retried at the named node; ``ASK`` is retried there after ``ASKING``; a
lost connection triggers a refresh of the map.

**Errors.** Refused, reset or timed-out connections are :class:`StoreUnavailable`; so are
``LOADING``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``READONLY`` and refused authentication. ``BUSY``
(a script running too long) and ``TRYAGAIN`` are :class:`StoreBusy`. Messages name the node,
never the password.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import os
import re
import ssl
import weakref
from binascii import hexlify
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from ..errors import ConfigError, CorruptRecord, StoreBusy, StoreError, StoreUnavailable
from ..records import Record, State
from ._resp import Connection, ConnectionLost, Reply, ReplyError, command, connect, key_slot
from .base import Store, StoreStats

__all__ = ["EXPIRY_GRACE", "UNREADABLE_TOKEN", "RedisStore"]

logger = logging.getLogger("retrysafe")

Address = tuple[str, int]
T = TypeVar("T")

EXPIRY_GRACE = 30.0
"""Seconds a record's native TTL outlasts its ``expires_at`` (see the module's notes)."""
UNREADABLE_TOKEN = -1
"""The token of a :class:`CorruptRecord` whose own token cannot be read."""
SCAN_COUNT = 1000
"""The ``COUNT`` of every ``SCAN``: how many hash buckets one step looks at."""
PURGE_SCAN_BUDGET = 100
"""Most ``SCAN`` steps one :meth:`RedisStore.purge_expired` call takes (about 100k keys)."""
MAX_REDIRECTS = 5
MAX_SECONDS = 1e12
"""The longest lease or ttl the scripts are given (about 31,700 years): longer ones, and
infinity, are cut to it. Past it the times a script writes would be read back as corrupt
(``num``), and ``PEXPIREAT``'s milliseconds would overflow and delete the record at once."""

_SCHEMES = {
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
_BUSY_CODES = frozenset({"BUSY", "TRYAGAIN"})
_FIELDS = (
    b"state", b"token", b"fingerprint", b"lease_until", b"expires_at", b"response", b"scope",
    b"created_at",
)  # fmt: skip
_STATES = {b"0": State.IN_FLIGHT, b"1": State.DONE, b"2": State.NOT_REPLAYABLE}
_TOKEN = re.compile(rb"0|[1-9][0-9]{0,18}")
"""A readable token: decimal, no sign, no leading zero (the Lua scripts use the same rule)."""


# -- the scripts ------------------------------------------------------------------------------

_PRELUDE = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function num(v)  -- a finite number, else nil (corrupt)
  local n = tonumber(v)
  if n and n == n and n > -1e15 and n < 1e15 then return n end
  return nil
end
local function stamp(x) return string.format('%.6f', x) end
local function expire(at)  -- the native TTL: EXPIRY_GRACE past the logical expiry
  redis.call('PEXPIREAT', key, string.format('%d', math.ceil(at * 1000) + GRACE_MS))
end
local function notify() redis.pcall(PUBLISH, key, '1') end
local function valid_token(v)
  return type(v) == 'string' and (v == '0' or (#v <= 19 and string.match(v, '^[1-9]%d*$') ~= nil))
end
"""
_FIELD_LIST = ", ".join(f"'{f.decode()}'" for f in _FIELDS)

_CLAIM = f"""
-- ARGV: token, fingerprint, lease, expiry (max(ttl, lease)), scope
-- Returns 0 when the claim is taken; else {{1, fields...}} (the live record) or
-- {{2, fields...}} (a record the script cannot judge: corrupt).
local r = redis.pcall('HMGET', key, {_FIELD_LIST})
if r.err then return {{2}} end
local taken = false
if r[1] or r[2] or r[3] or r[4] or r[5] or r[6] or r[7] or r[8] then
  local state, lease_until, expires_at = r[1], num(r[4]), num(r[5])
  if not (lease_until and expires_at and (state == '0' or state == '1' or state == '2')) then
    return {{2, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}}
  end
  if expires_at > now and not (state == '0' and lease_until <= now) then
    return {{1, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}}
  end
  taken = true  -- expired, or its holder's lease ran out: taken over
end
-- HSET first, as the script's first write: at maxmemory it is refused (OOM) before anything
-- changed, for a takeover as for a fresh claim. A DEL first would let it through (Redis
-- lets a script that wrote finish its writes) while the holder's renewals were refused.
local expires_at = now + tonumber(ARGV[4])
redis.call('HSET', key, 'state', '0', 'token', ARGV[1], 'fingerprint', ARGV[2],
  'lease_until', stamp(now + tonumber(ARGV[3])), 'expires_at', stamp(expires_at),
  'scope', ARGV[5], 'created_at', stamp(now))
if taken then redis.call('HDEL', key, 'response') end  -- every other field was rewritten
expire(expires_at)
return 0
"""

_RENEW = """
-- ARGV: token, lease. Returns 1 if the in-flight claim of token was extended, else 0.
local r = redis.pcall('HMGET', key, 'token', 'state', 'expires_at')
if r.err or r[1] ~= ARGV[1] or r[2] ~= '0' then return 0 end
local lease_until = now + tonumber(ARGV[2])
local expires_at = num(r[3])
-- The native TTL first: PEXPIREAT is allowed at maxmemory and, once a script wrote, so are
-- its other writes. A renewal grows nothing (same fields, same lengths), and a holder that
-- cannot renew on a full server would lose its claim to a duplicate: never refuse it.
if expires_at and expires_at >= lease_until then
  expire(expires_at)  -- unchanged
  redis.call('HSET', key, 'lease_until', stamp(lease_until))
else  -- never expire under a live holder
  expire(lease_until)
  redis.call('HSET', key, 'lease_until', stamp(lease_until), 'expires_at', stamp(lease_until))
end
return 1
"""

_COMPLETE = """
-- ARGV: token, state, ttl[, response]. Returns 1 if the in-flight claim of token was final-
-- ised, else 0.
local r = redis.pcall('HMGET', key, 'token', 'state')
if r.err or r[1] ~= ARGV[1] or r[2] ~= '0' then return 0 end
local expires_at = now + tonumber(ARGV[3])
if ARGV[4] then
  redis.call('HSET', key, 'state', ARGV[2], 'lease_until', stamp(now),
    'expires_at', stamp(expires_at), 'response', ARGV[4])
else
  redis.call('HSET', key, 'state', ARGV[2], 'lease_until', stamp(now),
    'expires_at', stamp(expires_at))
  redis.call('HDEL', key, 'response')
end
expire(expires_at)
notify()
return 1
"""

_RELEASE = """
-- ARGV: token, or '-1': the record whose token cannot be read. Returns 1 if deleted, else 0.
local tok = redis.pcall('HGET', key, 'token')
local mine
if type(tok) == 'table' then  -- not a hash at all
  mine = ARGV[1] == '-1'
elseif valid_token(tok) then
  mine = tok == ARGV[1]
else  -- no token field, or an unreadable one
  mine = ARGV[1] == '-1' and redis.call('EXISTS', key) == 1
end
if not mine then return 0 end
redis.call('DEL', key)
notify()
return 1
"""

_GET = f"""
-- Returns {{now, 0}} (absent), {{now, 1, fields...}} or {{now, 2}} (not a hash).
local r = redis.pcall('HMGET', key, {_FIELD_LIST})
if r.err then return {{stamp(now), 2}} end
if r[1] or r[2] or r[3] or r[4] or r[5] or r[6] or r[7] or r[8] then
  return {{stamp(now), 1, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}}
end
return {{stamp(now), 0}}
"""

_DELETE = """
if redis.call('DEL', key) == 0 then return 0 end
notify()
return 1
"""

_PURGE = """
-- Delete the record if it expired (by its expires_at); returns 1 if deleted.
local v = redis.pcall('HGET', key, 'expires_at')
if type(v) ~= 'string' then return 0 end
local expires_at = num(v)
if expires_at and expires_at <= now then
  redis.call('DEL', key)
  return 1
end
return 0
"""


class _Script:
    """A Lua script, sent by ``EVALSHA`` (one key), or in full by ``EVAL`` after NOSCRIPT."""

    __slots__ = ("_formats", "sha", "source")

    def __init__(self, body: str, publish: str) -> None:
        prelude = _PRELUDE.replace("GRACE_MS", str(int(EXPIRY_GRACE * 1000)))
        prelude = prelude.replace("PUBLISH", f"'{publish}'")
        self.source = (prelude + body).encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()
        # One format per number of arguments: the whole command is one ``%`` operation.
        self._formats = {
            n: b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$1\r\n1\r\n" % (n + 4, self.sha)
            + b"$%d\r\n%b\r\n" * (n + 1)
            for n in range(8)
        }

    def call(self, key: bytes, args: tuple[bytes, ...]) -> bytes:
        """The encoded ``EVALSHA sha 1 key args...``."""
        flat: list[int | bytes] = [len(key), key]
        for arg in args:
            flat += (len(arg), arg)
        return self._formats[len(args)] % tuple(flat)

    def eval(self, key: bytes, args: tuple[bytes, ...]) -> bytes:
        """The encoded ``EVAL source 1 key args...``: the same call, loading the script."""
        return command(b"EVAL", self.source, b"1", key, *args)


class _Scripts:
    __slots__ = ("all", "claim", "complete", "delete", "get", "purge", "release", "renew")

    def __init__(self, publish: str) -> None:
        self.claim = _Script(_CLAIM, publish)
        self.renew = _Script(_RENEW, publish)
        self.complete = _Script(_COMPLETE, publish)
        self.release = _Script(_RELEASE, publish)
        self.get = _Script(_GET, publish)
        self.delete = _Script(_DELETE, publish)
        self.purge = _Script(_PURGE, publish)
        self.all = (
            self.claim, self.renew, self.complete, self.release, self.get, self.delete, self.purge
        )  # fmt: skip


_STANDALONE_SCRIPTS = _Scripts("PUBLISH")
_CLUSTER_SCRIPTS = _Scripts("SPUBLISH")


# -- decoding records -------------------------------------------------------------------------


def _token_of(raw: Reply) -> int:
    if isinstance(raw, bytes) and _TOKEN.fullmatch(raw):
        return int(raw)
    return UNREADABLE_TOKEN


def _time(raw: Reply) -> float:
    if not isinstance(raw, bytes):
        raise ValueError("a time is missing")
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"a time is not finite: {raw!r}")
    return value


def _decode(fields: Sequence[Reply]) -> Record:
    """The record of the fields of ``_FIELDS``; CorruptRecord if they do not make one."""
    try:
        state, token, fingerprint, lease_until, expires_at, response, scope, created = fields
        if not (isinstance(token, bytes) and _TOKEN.fullmatch(token)):
            raise ValueError(f"unreadable token {token!r}")
        if not isinstance(fingerprint, bytes):
            raise ValueError("no fingerprint")
        if not (response is None or isinstance(response, bytes)):
            raise ValueError("unreadable response")
        if not (scope is None or isinstance(scope, bytes)):
            raise ValueError("unreadable scope")
        return Record(
            _STATES[state],  # type: ignore[index] # a KeyError for anything else
            int(token),
            fingerprint,
            _time(lease_until),
            _time(expires_at),
            response,
            scope or b"",
            0.0 if created is None else _time(created),
        )
    except (ValueError, TypeError, KeyError) as exc:
        token_field = fields[1] if len(fields) > 1 else None
        raise CorruptRecord(f"undecodable ledger record: {exc}", _token_of(token_field)) from exc


def _corrupt_whole() -> CorruptRecord:
    return CorruptRecord("undecodable ledger record: the key is not a hash", UNREADABLE_TOKEN)


# -- fork safety ------------------------------------------------------------------------------

_stores: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _forget_connections_in_child() -> None:
    """After ``fork()``, in the child: the parent's sockets are not ours to use."""
    for store in list(_stores):
        store._links.clear()
        store._link = None


os.register_at_fork(after_in_child=_forget_connections_in_child)


# -- per event loop state ---------------------------------------------------------------------


class _Subscriber:
    """One pub/sub connection to one node, shared by every waiter of one event loop."""

    def __init__(self, conn: Connection, sharded: bool) -> None:
        self.conn = conn
        self._subscribe = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsubscribe = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._waiters: dict[bytes, list[_Waiter]] = {}
        self._confirmed: set[bytes] = set()
        self._requested: list[bytes] = []
        """Channels whose subscription awaits the server's answer, oldest first."""
        self._leaving: dict[bytes, int] = {}
        """Unsubscriptions we asked for and whose confirmation is still to come."""
        conn.on_push = self._on_push
        conn.on_close = self._on_close

    def watch(self, channel: bytes) -> _Waiter:
        waiter = _Waiter(self.conn.loop)
        waiters = self._waiters.get(channel)
        if waiters is None:
            self._waiters[channel] = [waiter]
            self._requested.append(channel)
            self.conn.write(command(self._subscribe, channel))
        else:
            waiters.append(waiter)
            if channel in self._confirmed:
                waiter.ready.set_result(None)
        return waiter

    def unwatch(self, channel: bytes, waiter: _Waiter) -> None:
        waiters = self._waiters.get(channel)
        if waiters is None or waiter not in waiters:
            return
        waiters.remove(waiter)
        if not waiters:
            del self._waiters[channel]
            if channel in self._confirmed:
                self._leave(channel)

    def _leave(self, channel: bytes) -> None:
        self._confirmed.discard(channel)
        self._leaving[channel] = self._leaving.get(channel, 0) + 1
        if not self.conn.closed:
            self.conn.write(command(self._unsubscribe, channel))

    def _on_push(self, reply: Reply) -> None:
        if isinstance(reply, ReplyError):
            # Only a subscription can be refused (MOVED on a cluster, an unknown command on an
            # old server); answers come in order, so it is the oldest one asked for.
            if self._requested:
                channel = self._requested.pop(0)
                for waiter in self._waiters.get(channel, ()):
                    waiter.fail(reply)
            return
        if not (isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], bytes)):
            return
        kind, channel = reply[0], reply[1]
        if kind in (b"message", b"smessage"):
            for waiter in self._waiters.get(channel, ()):
                waiter.wake()
        elif kind in (b"subscribe", b"ssubscribe"):
            if channel in self._requested:
                self._requested.remove(channel)
            waiters = self._waiters.get(channel)
            if waiters:
                self._confirmed.add(channel)
                for waiter in waiters:
                    if not waiter.ready.done():
                        waiter.ready.set_result(None)
            else:  # every waiter left before the confirmation came
                self._leave(channel)
        elif kind in (b"unsubscribe", b"sunsubscribe"):
            leaving = self._leaving.get(channel, 0)
            if leaving:
                if leaving == 1:
                    del self._leaving[channel]
                else:
                    self._leaving[channel] = leaving - 1
                return
            # The server dropped the subscription (its slot moved): wake the waiters, who look
            # at the record again and wait anew.
            self._confirmed.discard(channel)
            for waiter in self._waiters.get(channel, ()):
                waiter.wake()

    def _on_close(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.wake()
        self._waiters.clear()


class _Waiter:
    __slots__ = ("ready", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ready: asyncio.Future[None] = loop.create_future()
        """Done when the subscription is in place (an exception if it was refused)."""
        self.woken: asyncio.Future[None] = loop.create_future()

    def wake(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        if not self.woken.done():
            self.woken.set_result(None)

    def fail(self, error: ReplyError) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"subscription refused: {error.message}"))


class _Link:
    """What a store holds on one event loop: a connection per node, a subscriber per node."""

    __slots__ = ("conns", "loop", "opening", "refreshing", "subscribers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.conns: dict[Address, Connection] = {}
        self.subscribers: dict[Address, _Subscriber] = {}
        self.opening: dict[tuple[Address, bool], asyncio.Task[Connection]] = {}
        self.refreshing: asyncio.Task[list[Address | None]] | None = None

    def close(self) -> None:
        for task in self.opening.values():
            task.cancel()
        for conn in self.conns.values():
            conn.close()
        for subscriber in self.subscribers.values():
            subscriber.conn.close()
        if self.refreshing is not None:
            self.refreshing.cancel()
        self.opening.clear()
        self.conns.clear()
        self.subscribers.clear()


def _node_name(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _parse_address(text: str, default_host: str) -> Address:
    host, _, port = text.rpartition(":")
    return (host or default_host).strip("[]"), int(port)


def _glob_escape(text: bytes) -> bytes:
    return re.sub(rb"([\\*?\[\]])", rb"\\\1", text)


_numbers: dict[float, bytes] = {}


def _number(value: float) -> bytes:
    """``value`` (at most ``MAX_SECONDS``) as the decimal a Lua ``tonumber`` reads (leases and
    ttls repeat: cached)."""
    encoded = _numbers.get(value)
    if encoded is None:
        if math.isnan(value):
            raise ValueError(f"not a number of seconds: {value}")
        if len(_numbers) > 256:
            _numbers.clear()
        encoded = _numbers[value] = repr(float(min(value, MAX_SECONDS))).encode()
    return encoded


# -- the store --------------------------------------------------------------------------------


class RedisStore(Store):
    """A ledger in Redis (one server, or a cluster): shared by every host that reaches it.

    See the module's notes for the layout, the scripts, expiry and waiting. Create it with
    :meth:`from_url` (or :func:`retrysafe.open_store`); nothing connects until first use.
    """

    def __init__(
        self,
        nodes: Sequence[Address],
        *,
        cluster: bool = False,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        prefix: str = "retrysafe",
        timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not nodes:
            raise ConfigError("the redis ledger needs at least one node")
        if cluster and db:
            raise ConfigError("a Redis Cluster has only database 0")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"redis timeout must be a finite number of seconds > 0: {timeout}")
        if not prefix or not prefix.isprintable() or any(c.isspace() for c in prefix):
            raise ConfigError(f"redis key prefix must be printable, without spaces: {prefix!r}")
        if db < 0:
            raise ConfigError(f"redis database must be >= 0: {db}")
        self.nodes = list(nodes)
        self.cluster = cluster
        self.db = db
        self.prefix = prefix
        self.timeout = float(timeout)
        self._username = username
        self._password = password
        self._ssl = ssl_context
        self._key_prefix = prefix.encode() + b":"
        self._key_length = len(self._key_prefix) + 64
        self._pattern = _glob_escape(self._key_prefix) + b"*"
        self._scripts = _CLUSTER_SCRIPTS if cluster else _STANDALONE_SCRIPTS
        names = ",".join(_node_name(node) for node in self.nodes)
        self._where = f"redis cluster ledger {names}" if cluster else f"redis ledger {names}/{db}"
        # Event loop -> its connections; _link is the last one used (the common case: one loop).
        self._links: dict[asyncio.AbstractEventLoop, _Link] = {}
        self._link: _Link | None = None
        # The cluster's slot map (slot -> master), shared by every loop; None until read.
        self._slots: list[Address | None] | None = None
        self._stale = False
        self._purge_cursors: dict[Address, bytes] = {}
        _stores.add(self)

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """The store a ``redis://``, ``rediss://``, ``redis+cluster://`` or ``rediss+cluster://``
        URL names (see the module's notes); ConfigError if it is malformed."""
        from . import redact_url  # here: the package imports this module lazily

        shown = redact_url(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"{shown}: malformed URL: {exc}") from None
        if parts.scheme not in _SCHEMES:
            raise ConfigError(f"{shown}: not a redis URL")
        tls, cluster = _SCHEMES[parts.scheme]
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
            if password is None and username is not None:
                # redis-cli reads redis://secret@host as a password, redis-py as a user name:
                # refuse the ambiguity, and show none of it.
                raise ConfigError(
                    f"{shown}: write redis://:password@host for a password alone,"
                    " or redis://user:password@host"
                )
        nodes: list[Address] = []
        for item in hostlist.split(","):
            match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/]+)(?::(\d{1,5}))?", item)
            if match is None:
                raise ConfigError(f"{shown}: malformed host:port {item!r}")
            host, port = match.group(1).strip("[]"), int(match.group(2) or 6379)
            if not 0 < port < 65536:
                raise ConfigError(f"{shown}: port out of range: {port}")
            nodes.append((host, port))
        if len(nodes) > 1 and not cluster:
            raise ConfigError(
                f"{shown}: several hosts need a redis+cluster:// URL (or rediss+cluster://)"
            )
        db = 0
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ConfigError(f"{shown}: the database must be a number, not {path!r}")
            db = int(path)
            if cluster and db:
                raise ConfigError(f"{shown}: a Redis Cluster has only database 0")
        if parts.fragment:
            raise ConfigError(f"{shown}: a redis URL takes no #fragment")
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError:
            raise ConfigError(f"{shown}: malformed query string") from None
        options: dict[str, str] = {}
        for name, value in pairs:
            if name in options:
                raise ConfigError(f"{shown}: option given more than once: {name}")
            options[name] = value
        kwargs: dict[str, Any] = {}
        if "prefix" in options:
            kwargs["prefix"] = options.pop("prefix")
        if "timeout" in options:
            raw = options.pop("timeout")
            try:
                kwargs["timeout"] = float(raw)
            except ValueError:
                raise ConfigError(
                    f"{shown}: timeout must be a number of seconds, not {raw!r}"
                ) from None
        ssl_context = None
        ca_certs = options.pop("ssl_ca_certs", None)
        cert_reqs = options.pop("ssl_cert_reqs", None)
        certfile = options.pop("ssl_certfile", None)
        keyfile = options.pop("ssl_keyfile", None)
        if options:
            raise ConfigError(f"{shown}: unknown option(s) {', '.join(sorted(options))}")
        if tls:
            if cert_reqs not in (None, "required", "none"):
                raise ConfigError(f"{shown}: ssl_cert_reqs must be required or none")
            try:
                ssl_context = ssl.create_default_context(cafile=ca_certs)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{shown}: cannot load ssl_ca_certs: {exc}") from None
            if cert_reqs == "none":
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
            if keyfile is not None and certfile is None:
                raise ConfigError(f"{shown}: ssl_keyfile needs ssl_certfile")
            if certfile is not None:
                try:
                    # No password: an encrypted key fails here instead of OpenSSL
                    # prompting on the terminal of a server.
                    ssl_context.load_cert_chain(certfile, keyfile, password=b"")
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(
                        f"{shown}: cannot load ssl_certfile/ssl_keyfile: {exc}"
                    ) from None
        elif any(v is not None for v in (ca_certs, cert_reqs, certfile, keyfile)):
            raise ConfigError(
                f"{shown}: ssl_ca_certs, ssl_cert_reqs, ssl_certfile and ssl_keyfile need rediss://"
            )
        try:
            return cls(
                nodes,
                cluster=cluster,
                db=db,
                username=username,
                password=password,
                ssl_context=ssl_context,
                **kwargs,
            )
        except ConfigError as exc:
            raise ConfigError(f"{shown}: {exc}") from None

    def __repr__(self) -> str:
        return f"<RedisStore {self._where} prefix={self.prefix!r}>"

    # -- connections ------------------------------------------------------------------------

    def _key(self, rid: bytes) -> bytes:
        return self._key_prefix + hexlify(rid)

    def _current_link(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = self._link
        if link is not None and link.loop is loop:
            return link
        link = self._links.get(loop)
        if link is None:
            # list() first: another thread (another loop) may add its own link meanwhile.
            for other in [lp for lp in list(self._links) if lp.is_closed()]:
                self._links.pop(other, None)  # a finished asyncio.run(): its sockets died
            link = self._links[loop] = _Link(loop)
        self._link = link
        return link

    async def _open(self, link: _Link, addr: Address, pubsub: bool = False) -> Connection:
        """The connection to ``addr`` on ``link``'s loop, opened if needed (once, however many
        callers ask at the same time)."""
        task = link.opening.get((addr, pubsub))
        if task is None:
            task = link.loop.create_task(self._connect(link, addr, pubsub))
            link.opening[(addr, pubsub)] = task

            def done(finished: asyncio.Task[Connection]) -> None:
                if link.opening.get((addr, pubsub)) is finished:
                    del link.opening[(addr, pubsub)]
                if not finished.cancelled():
                    finished.exception()  # retrieved: callers may all have given up

            task.add_done_callback(done)
        return await self._shared(task)

    async def _connect(self, link: _Link, addr: Address, pubsub: bool) -> Connection:
        try:
            conn = await connect(
                addr[0],
                addr[1],
                timeout=self.timeout,
                ssl_context=self._ssl,
                username=self._username,
                password=self._password,
                db=0 if pubsub else self.db,  # channels are not per database
            )
        except ReplyError as exc:
            raise self._refused(addr, exc) from None
        except ValueError as exc:  # a host name IDNA cannot encode ("a..b"), say
            raise self._lost(addr, exc) from exc
        if pubsub:
            link.subscribers[addr] = _Subscriber(conn, sharded=self.cluster)
        else:
            link.conns[addr] = conn
        return conn

    def _lost(self, addr: Address, exc: BaseException) -> StoreUnavailable:
        """The error for a node that cannot be reached (or went silent)."""
        if self.cluster:
            self._stale = True  # it may have failed over: read the map again
        return StoreUnavailable(f"redis ledger {_node_name(addr)}: {_describe(exc)}")

    def _refused(self, addr: Address, error: ReplyError) -> StoreError:
        """The error for an error reply that no retry can fix."""
        message = f"redis ledger {_node_name(addr)}: {error.message}"
        if error.code in _BUSY_CODES:
            return StoreBusy(message)
        if error.code in ("READONLY", "MASTERDOWN", "CLUSTERDOWN") and self.cluster:
            self._stale = True
        if error.code == "READONLY":  # a failed-over server: reconnect (DNS may have moved)
            for link in list(self._links.values()):
                conn = link.conns.pop(addr, None)
                if conn is not None and link.loop is asyncio.get_running_loop():
                    conn.close()
        if error.code in ("ERR", "NOSCRIPT", "MOVED", "ASK", "WRONGTYPE"):
            return StoreError(message)
        return StoreUnavailable(message)  # LOADING, CLUSTERDOWN, NOAUTH, WRONGPASS, OOM, ...

    async def _send(
        self, link: _Link, addr: Address, payload: bytes, *, asking: bool = False
    ) -> Reply:
        """Send ``payload`` to ``addr``, connecting if needed; connection errors mapped."""
        conn = link.conns.get(addr)
        try:
            if conn is None or conn.closed:
                conn = await self._open(link, addr)
            if asking:
                return await conn.send_asking(payload)
            return await conn.send(payload)
        except OSError as exc:
            raise self._lost(addr, exc) from exc

    async def _run(self, script: _Script, key: bytes, args: tuple[bytes, ...]) -> Reply:
        """Run ``script`` on ``key`` where its slot lives: the hot path of every primitive."""
        link = self._link
        if link is None or link.loop is not asyncio.get_running_loop():
            link = self._current_link()
        if self.cluster:
            slots = self._slots
            if slots is None or self._stale:
                slots = await self._refresh(link)
            addr = slots[key_slot(key)]
            if addr is None:
                raise StoreUnavailable(f"{self._where}: no master serves the slot of a key")
        else:
            addr = self.nodes[0]
        conn = link.conns.get(addr)
        try:
            if conn is None or conn.closed:
                conn = await self._open(link, addr)
            reply = await conn.send(script.call(key, args))
        except OSError as exc:
            raise self._lost(addr, exc) from exc
        if type(reply) is ReplyError:
            return await self._redo(link, addr, reply, script, key, args)
        return reply

    async def _redo(
        self,
        link: _Link,
        addr: Address,
        error: ReplyError,
        script: _Script,
        key: bytes,
        args: tuple[bytes, ...],
    ) -> Reply:
        """Retry after NOSCRIPT (as EVAL), MOVED (at the new owner), ASK (with ASKING)."""
        asking = False
        for _ in range(MAX_REDIRECTS):
            if error.code == "NOSCRIPT":
                payload = script.eval(key, args)  # keeps ``asking``: the same node is asked
            elif error.code in ("MOVED", "ASK") and self.cluster:
                try:
                    slot_text, target = error.message.split()[1:3]
                    slot, addr = int(slot_text), _parse_address(target, addr[0])
                except ValueError:
                    raise self._refused(addr, error) from None
                asking = error.code == "ASK"
                if not asking:
                    self._stale = True  # the map is read again on the next call
                    if self._slots is not None:
                        self._slots[slot] = addr
                payload = script.call(key, args)
            else:
                raise self._refused(addr, error)
            reply = await self._send(link, addr, payload, asking=asking)
            if type(reply) is not ReplyError:
                return reply
            error = reply
        raise StoreUnavailable(f"{self._where}: too many redirections ({error.message})")

    async def _refresh(self, link: _Link) -> list[Address | None]:
        """Read the cluster's slot map (once, however many callers ask at the same time)."""
        task = link.refreshing
        if task is None or task.done():
            task = link.refreshing = link.loop.create_task(self._read_slots(link))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await self._shared(task)

    async def _shared(self, task: asyncio.Task[T]) -> T:
        """Await a task other callers share; if the store's close cancelled it under a caller
        that was not cancelled itself, that caller gets StoreUnavailable, not CancelledError."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise StoreUnavailable(f"{self._where}: the store was closed") from None
            raise

    async def _read_slots(self, link: _Link) -> list[Address | None]:
        known = sorted({a for a in self._slots or () if a is not None})
        candidates = list(dict.fromkeys([*known, *self.nodes]))
        errors: list[str] = []
        for addr in candidates:
            try:
                reply = await self._send(link, addr, command(b"CLUSTER", b"SLOTS"))
            except StoreError as exc:
                errors.append(str(exc))
                continue
            if isinstance(reply, ReplyError) or not isinstance(reply, list):
                errors.append(f"{_node_name(addr)}: {reply!r}")
                continue
            slots: list[Address | None] = [None] * 16384
            try:
                for entry in reply:
                    if not isinstance(entry, list):
                        raise ValueError(entry)
                    start, end, master = entry[0], entry[1], entry[2]
                    if not isinstance(master, list):
                        raise ValueError(master)
                    host, port = master[0], master[1]
                    if not (isinstance(start, int) and isinstance(end, int)):
                        raise ValueError(entry)
                    if not (isinstance(host, bytes) and isinstance(port, int)):
                        raise ValueError(master)
                    # An empty host (or "?") means "the address you reached me at".
                    name = host.decode() if host not in (b"", b"?") else addr[0]
                    owner = (name, port)
                    for slot in range(start, end + 1):
                        slots[slot] = owner
            except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
                errors.append(f"{_node_name(addr)}: malformed CLUSTER SLOTS reply")
                continue
            self._slots = slots
            self._stale = False
            return slots
        raise StoreUnavailable(f"{self._where}: no node gave the slot map: {'; '.join(errors)}")

    async def _masters(self, link: _Link) -> list[Address]:
        """Every node that holds records, sorted (the order of scans)."""
        if not self.cluster:
            return [self.nodes[0]]
        slots = self._slots
        if slots is None or self._stale:
            slots = await self._refresh(link)
        return sorted({a for a in slots if a is not None})

    async def _node_command(self, link: _Link, addr: Address, *args: bytes) -> Reply:
        reply = await self._send(link, addr, command(*args))
        if isinstance(reply, ReplyError):
            raise self._refused(addr, reply)
        return reply

    # -- primitives -------------------------------------------------------------------------

    async def claim(
        self,
        rid: bytes,
        token: int,
        fingerprint: bytes,
        lease: float,
        ttl: float,
        *,
        scope: bytes = b"",
    ) -> Record | None:
        args = (b"%d" % token, fingerprint, _number(lease), _number(max(ttl, lease)), scope)
        reply = await self._run(self._scripts.claim, self._key(rid), args)
        if reply == 0:
            return None
        if not isinstance(reply, list) or not reply:
            raise StoreError(f"{self._where}: unexpected claim reply {reply!r}")
        if reply[0] == 1:
            return _decode(reply[1:])
        if len(reply) < 3:
            raise _corrupt_whole()
        # The script could not read the state or the times: corrupt, whatever Python makes of it.
        raise CorruptRecord(
            "undecodable ledger record: unreadable state, lease_until or expires_at",
            _token_of(reply[2]),
        )

    async def renew(self, rid: bytes, token: int, lease: float) -> bool:
        args = (b"%d" % token, _number(lease))
        return await self._run(self._scripts.renew, self._key(rid), args) == 1

    async def complete(
        self, rid: bytes, token: int, state: State, response: bytes | None, ttl: float
    ) -> bool:
        args: tuple[bytes, ...] = (b"%d" % token, b"%d" % state, _number(ttl))
        if response is not None:
            args += (response,)
        return await self._run(self._scripts.complete, self._key(rid), args) == 1

    async def release(self, rid: bytes, token: int) -> bool:
        return await self._run(self._scripts.release, self._key(rid), (b"%d" % token,)) == 1

    async def get(self, rid: bytes) -> Record | None:
        return self._live(await self._run(self._scripts.get, self._key(rid), ()))

    def _live(self, reply: Reply) -> Record | None:
        """The record of a ``_GET`` reply if it is live; None if absent or expired."""
        if not (isinstance(reply, list) and len(reply) >= 2):
            raise StoreError(f"{self._where}: unexpected reply {reply!r}")
        if reply[1] == 0:
            return None
        if reply[1] == 2:
            raise _corrupt_whole()
        record = _decode(reply[2:])
        return record if record.expires_at > _time(reply[0]) else None

    async def delete(self, rid: bytes) -> bool:
        return await self._run(self._scripts.delete, self._key(rid), ()) == 1

    def _record_keys(self, keys: Reply) -> list[bytes]:
        """The keys of a SCAN step that name records (prefix and 64 hex digits), sorted."""
        if not isinstance(keys, list):
            return []
        found = set()
        for key in keys:
            if isinstance(key, bytes) and len(key) == self._key_length:
                try:
                    bytes.fromhex(key[len(self._key_prefix) :].decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    continue
                found.add(key)
        return sorted(found)

    async def _scan_step(self, link: _Link, addr: Address, cursor: bytes) -> tuple[bytes, Reply]:
        reply = await self._node_command(
            link, addr, b"SCAN", cursor, b"MATCH", self._pattern, b"COUNT", b"%d" % SCAN_COUNT
        )
        if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes)):
            raise StoreError(f"{_node_name(addr)}: unexpected SCAN reply")
        return reply[0], reply[1]

    async def _read_all(self, keys: list[bytes]) -> list[Reply]:
        get = self._scripts.get
        return await asyncio.gather(*(self._run(get, key, ()) for key in keys))

    async def purge_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records still held (native TTL removes the rest).

        A ``SCAN`` sweep over each master, resumed where the last call stopped; one call takes
        at most ``PURGE_SCAN_BUDGET`` SCAN steps and at most one pass over each master.
        """
        if limit <= 0:
            return 0
        link = self._current_link()
        deleted = steps = 0
        purge = self._scripts.purge
        for addr in await self._masters(link):
            cursor = self._purge_cursors.get(addr, b"0")
            while deleted < limit and steps < PURGE_SCAN_BUDGET:
                steps += 1
                following, raw = await self._scan_step(link, addr, cursor)
                keys = self._record_keys(raw)
                done = 0
                while done < len(keys) and deleted < limit:
                    chunk = keys[done : done + limit - deleted]
                    done += len(chunk)
                    results = await asyncio.gather(*(self._run(purge, k, ()) for k in chunk))
                    deleted += sum(1 for r in results if r == 1)
                if done < len(keys):
                    break  # the rest of this step next time: the cursor stays
                cursor = following
                if cursor == b"0":
                    break  # a full pass over this master
            self._purge_cursors[addr] = cursor
            if deleted >= limit or steps >= PURGE_SCAN_BUDGET:
                break
        return deleted

    async def scan(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[bytes, Record]], str | None]:
        """A page of live records; the cursor is ``host|port|scan cursor|last rid returned``.

        Records come in ``SCAN`` order, master by master (in a step, by rid). As with ``SCAN``
        itself, a record present from the first page to the last is returned; one written or
        moved during the scan may be missed, and a resize of Redis' table may repeat one.
        """
        link = self._current_link()
        masters = await self._masters(link)
        index, position, after = 0, b"0", b""
        if cursor:
            try:
                host, port, position_text, after_text = cursor.split("|")
                addr = (host, int(port))
                position = str(int(position_text)).encode()
                after = self._key_prefix + after_text.encode() if after_text else b""
            except ValueError:
                raise ValueError(f"not a cursor of this store: {cursor!r}") from None
            index = bisect.bisect_left(masters, addr)
            if index >= len(masters) or masters[index] != addr:
                position, after = b"0", b""  # the topology changed: resume at the next master
        page: list[tuple[bytes, Record]] = []
        while index < len(masters) and len(page) < limit:
            addr = masters[index]
            following, raw = await self._scan_step(link, addr, position)
            keys = [k for k in self._record_keys(raw) if k > after]
            live: list[tuple[bytes, Record]] = []
            for key, reply in zip(keys, await self._read_all(keys), strict=True):
                try:
                    record = self._live(reply)
                except CorruptRecord:
                    continue  # the request path drops it when the key comes back
                if record is not None:
                    live.append((bytes.fromhex(key[len(self._key_prefix) :].decode()), record))
            room = limit - len(page)
            if len(live) > room:
                page += live[:room]
                return page, f"{addr[0]}|{addr[1]}|{position.decode()}|{page[-1][0].hex()}"
            page += live
            after = b""
            if following == b"0":
                index, position = index + 1, b"0"
            else:
                position = following
        if index >= len(masters):
            return page, None
        addr = masters[index]
        return page, f"{addr[0]}|{addr[1]}|{position.decode()}|"

    async def stats(self) -> StoreStats:
        """Count the records by state: a full ``SCAN`` of every master (operators only)."""
        link = self._current_link()
        counts = {State.IN_FLIGHT: 0, State.DONE: 0, State.NOT_REPLAYABLE: 0}
        expired = 0
        for addr in await self._masters(link):
            position = b"0"
            while True:
                position, raw = await self._scan_step(link, addr, position)
                keys = self._record_keys(raw)
                for reply in await self._read_all(keys):
                    if not (isinstance(reply, list) and len(reply) >= 2 and reply[1] == 1):
                        continue  # gone since, or not a hash
                    try:
                        record = _decode(reply[2:])
                        now = _time(reply[0])
                    except (CorruptRecord, ValueError):
                        continue
                    if record.expires_at <= now:
                        expired += 1
                    else:
                        counts[record.state] += 1
                if position == b"0":
                    break
        return StoreStats(
            in_flight=counts[State.IN_FLIGHT],
            done=counts[State.DONE],
            not_replayable=counts[State.NOT_REPLAYABLE],
            expired=expired,
        )

    # -- waiting ----------------------------------------------------------------------------

    async def wait(self, rid: bytes, timeout: float) -> None:  # noqa: ASYNC109
        """Return when ``rid`` completes or is released (notified by pub/sub), or after
        ``timeout`` seconds; poll every ``poll_interval`` if subscribing fails."""
        if timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._notified(self._key(rid))
            return
        except TimeoutError:
            if loop.time() >= deadline:
                return
            reason = "timed out"
        except (StoreError, CorruptRecord, OSError) as exc:
            reason = _describe(exc)
        logger.debug("retrysafe: %s: waiting by polling: %s", self._where, reason)
        await asyncio.sleep(max(0.0, min(deadline - loop.time(), self.poll_interval)))

    async def _notified(self, key: bytes) -> None:
        link = self._current_link()
        if self.cluster:
            slots = self._slots
            if slots is None or self._stale:
                slots = await self._refresh(link)
            addr = slots[key_slot(key)]
            if addr is None:
                raise StoreUnavailable(f"{self._where}: no master serves the slot of a key")
        else:
            addr = self.nodes[0]
        subscriber = link.subscribers.get(addr)
        if subscriber is None or subscriber.conn.closed:
            link.subscribers.pop(addr, None)
            try:
                await self._open(link, addr, pubsub=True)
            except OSError as exc:
                raise self._lost(addr, exc) from exc
            subscriber = link.subscribers[addr]
        waiter = subscriber.watch(key)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await waiter.ready
            except TimeoutError:
                # A silent subscriber (a peer gone without a reset, a dropped NAT mapping):
                # drop it, so that the next waiter opens a new one; this one polls.
                why = f"{_node_name(addr)}: no answer to a subscription in {self.timeout:g} s"
                subscriber.conn.abort(ConnectionLost(why))
                raise ConnectionLost(why) from None
            # Subscribed: a change from now on is notified. Look once more, in case the
            # record changed before the subscription took effect.
            reply = await self._run(self._scripts.get, key, ())
            record = self._live(reply)
            if record is None or record.state is not State.IN_FLIGHT:
                return
            # A holder that dies sends no notice: wake when its lease ends, to take over.
            lease_left = record.lease_until - _time(reply[0])  # type: ignore[index]
            if lease_left > 0:
                await asyncio.wait([waiter.woken], timeout=lease_left)
        except CorruptRecord:
            return  # the claim that follows drops it
        finally:
            subscriber.unwatch(key, waiter)

    # -- life cycle -------------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect to every master and load the scripts there (``SCRIPT LOAD``)."""
        link = self._current_link()
        for addr in await self._masters(link):
            for script in self._scripts.all:
                reply = await self._node_command(link, addr, b"SCRIPT", b"LOAD", script.source)
                if reply != script.sha:
                    raise StoreError(f"{_node_name(addr)}: SCRIPT LOAD answered {reply!r}")

    async def aclose(self) -> None:
        """Close every connection of this store (it reconnects if used again)."""
        links = list(self._links.values())
        self._links.clear()
        self._link = None
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for link in links:
            if link.loop is current:
                link.close()
            elif not link.loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    link.loop.call_soon_threadsafe(link.close)
