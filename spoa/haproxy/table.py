"""Publishing the agent's decision table into HAProxy, so HAProxy decides without asking the agent.

Owns: the two maps of the table as this process last published them, replacing a map atomically
(`prepare map` → `add map @<version>` in chunks → `commit map`), and rewriting the map files
atomically (temporary file + rename) so an HAProxy reload starts from the current table.
Must not: decide anything (the Router computes the table: `Router.decision_table`), touch the
cookie map (the writer keeps it, ordered with the server actions) or raise on socket trouble.

The maps (haproxy.cfg reads them; their paths are the settings' `slot_map` and `server_cookie_map`):
- slot → server name, all 65,536 slots: the Router's per-slot target, the fallback rule for members
  that are not UP included. HAProxy computes a key's slot with `crc32,div(65536)` (spoa.ring).
  Published with DECIDE=table only.
- server name → sticky cookie value: a decision that issues the cookie (the table's or the agent's)
  sets the cookie of the server that served the request. Published whenever the chain names the
  sticky cookie, with either DECIDE.

Atomicity: HAProxy answers lookups from the committed version until `commit map` switches to the
new one at once, so a request sees the whole old table or the whole new one, never a mix. A
publication that fails half-way leaves the old version in force; its partial version is purged by
the next `commit map` (HAProxy drops versions older than the one committed).

Cost of a full replacement of 65,536 slots (bench/publish.py, docs/performance.md): HAProxy's own
CPU is most of it (75-100 ms parsing the `add map` lines into its string tree, ~30 ms purging the
old version at `commit map`, on the shared 2-CPU machine); the lines go in key-text order, which
HAProxy inserts with fewer cache misses, built in ~7 ms; ~99 chunks, one connection each. Medians
of 115-120 ms before that order on a quiet machine; 137-335 ms on a busy one. A table equal
to the published one costs nothing (compared by identity, then by value), so the steady state
sends no command at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from spoa.haproxy.answers import prepared_version
from spoa.haproxy.errors import RuntimeAPIError, RuntimeAPIUnavailable
from spoa.haproxy.runtime import MAX_PAYLOAD_BYTES, RuntimeAPI, validate_map_path
from spoa.ring.hashing import TABLE_SIZE

# The slots in the order their lines are sent: by their key as text ("0", "1", "10", "100", ...).
# HAProxy indexes a string map in a string tree (`ebst_insert` was the top of its profile): keys in
# this order land next to the previous one, so fewer cache misses per insert and per purge at commit
# (bench/publish.py, docs/performance.md: HAProxy's CPU per full publication ~10 % lower than with
# numeric order, and twice as high with an order that scatters the keys).
_SLOT_ORDER = tuple(sorted(range(TABLE_SIZE), key=str))
_in_send_order = operator.itemgetter(*_SLOT_ORDER)
# b"0 ", b"1 ", b"10 ", ... : the key part of every slot line, in send order.
_SLOT_PREFIXES = tuple(f"{i} ".encode() for i in _SLOT_ORDER)


@dataclass(frozen=True, slots=True, eq=False)
class DecisionTable:
    """One published state: the server of every slot, and the cookie value of every server."""

    slots: tuple[str, ...]
    cookies: Mapping[str, str] = field(default_factory=dict)

    def slot_lines(self) -> bytes:
        """`<slot> <server>` lines in send order (`_SLOT_ORDER`), a slot without a server left out.

        ~6-8 ms for 65,536 slots: the prefixes are made once, each server's `<name>\n` once per
        call, and the lines are one `join` of prefix, name, prefix, name, ...
        """
        ends = {name: name.encode() + b"\n" for name in set(self.slots)}
        named: tuple[str, ...] = _in_send_order(self.slots) if len(self.slots) == TABLE_SIZE else ()
        if not named or "" in ends:  # a short table (tests) or slots without a server
            by_slot = dict(enumerate(self.slots))
            return b"".join([_SLOT_PREFIXES[i] + ends[by_slot[s]]
                             for i, s in enumerate(_SLOT_ORDER) if by_slot.get(s)])
        parts: list[bytes] = [b""] * (2 * TABLE_SIZE)
        parts[0::2] = _SLOT_PREFIXES
        parts[1::2] = map(ends.__getitem__, named)
        return b"".join(parts)

    def cookie_lines(self) -> bytes:
        return "".join(f"{name} {value}\n" for name, value in sorted(self.cookies.items())).encode()


@dataclass(frozen=True, slots=True)
class PublishReport:
    """What one `publish` did: nothing (`changed` False), or which maps it replaced and how long it took."""

    changed: bool
    ok: bool = True
    maps: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str = ""
    file_errors: tuple[str, ...] = ()  # HAProxy holds the table, but a reload would not start from it


def chunks(lines: bytes, limit: int = MAX_PAYLOAD_BYTES) -> list[bytes]:
    """`lines` cut at line ends into pieces of at most `limit` bytes (a longer line: ValueError)."""
    out: list[bytes] = []
    start = 0
    size = len(lines)
    while start < size:
        end = start + limit
        if end >= size:
            out.append(lines[start:])
            break
        cut = lines.rfind(b"\n", start, end)
        if cut < start:
            raise ValueError(f"a map line is longer than {limit} bytes")
        out.append(lines[start:cut + 1])
        start = cut + 1
    return out


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file at `path` with `data`: readers see the old file or the new one, never a part."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TablePublisher:
    """Keeps HAProxy's slot map and server → cookie map equal to the last table given to `publish`."""

    def __init__(self, api: RuntimeAPI, slot_map: str | None, cookie_map: str | None, *,
                 write_files: bool = True) -> None:
        """`slot_map`, `cookie_map`: the map files to keep; None: that map is not published."""
        for path in (slot_map, cookie_map):
            if path is None:
                continue
            validate_map_path(path)
        self.api = api
        self.slot_map = slot_map
        self.cookie_map = cookie_map
        self.write_files = write_files
        self._slots: tuple[str, ...] | None = None  # as HAProxy holds them (None: unknown)
        self._cookies: Mapping[str, str] | None = None
        self.published: DecisionTable | None = None  # the last table HAProxy holds in full
        self.last_seconds = 0.0

    def is_current(self, table: DecisionTable) -> bool:
        """True when HAProxy holds exactly `table`."""
        return table is self.published or (not self._slots_stale(table) and not self._cookies_stale(table))

    def _slots_stale(self, table: DecisionTable) -> bool:
        # No slots (no member UP): HAProxy keeps deciding from the table it holds.
        return self.slot_map is not None and bool(table.slots) and table.slots != self._slots

    def _cookies_stale(self, table: DecisionTable) -> bool:
        return self.cookie_map is not None and (self._cookies is None or dict(table.cookies) != dict(self._cookies))

    def forget(self) -> None:
        """HAProxy lost what we published (restarted from files we may not have written): publish again."""
        self._slots = self._cookies = None
        self.published = None

    async def publish(self, table: DecisionTable) -> PublishReport:
        """Make HAProxy's maps equal to `table`: the cookie map first (every server the slots may
        name has its cookie before a slot names it), then the slots. Never raises for socket trouble."""
        if self.is_current(table):
            self.published = table
            return PublishReport(changed=False)
        started = time.perf_counter()
        replaced: list[str] = []
        files: list[tuple[str, bytes]] = []
        try:
            if self.cookie_map is not None and self._cookies_stale(table):
                lines = table.cookie_lines()
                await self._replace(self.cookie_map, lines)
                self._cookies = dict(table.cookies)
                replaced.append(self.cookie_map)
                files.append((self.cookie_map, lines))
            if self.slot_map is not None and self._slots_stale(table):
                lines = table.slot_lines()
                await self._replace(self.slot_map, lines)
                self._slots = table.slots
                replaced.append(self.slot_map)
                files.append((self.slot_map, lines))
        except (RuntimeAPIUnavailable, RuntimeAPIError) as e:
            return PublishReport(changed=True, ok=False, maps=tuple(replaced),
                                 seconds=time.perf_counter() - started, error=str(e))
        self.published = table
        self.last_seconds = time.perf_counter() - started
        # The files after the commit and off the timed path (HAProxy already decides from the new
        # table; the files only matter to a reload), in a thread so the loop keeps answering SPOE
        # meanwhile; awaited, so the next publication cannot overtake this one's write.
        file_errors = []
        for path, lines in files if self.write_files else ():
            try:
                await asyncio.to_thread(write_atomically, path, lines)
            except OSError as e:
                file_errors.append(f"{path}: {e}")
        return PublishReport(changed=True, maps=tuple(replaced), seconds=self.last_seconds,
                             file_errors=tuple(file_errors))

    async def _replace(self, map_file: str, lines: bytes) -> None:
        """Replace one map atomically in HAProxy."""
        async with self.api.session() as s:
            version = prepared_version(await s.command(f"prepare map {map_file}"))
        # One connection per chunk, one after the other: sending 2-8 at once on parallel
        # connections measured no faster (bench/publish.py; HAProxy's parsing dominates).
        for chunk in chunks(lines):
            await self.api.payload_command(f"add map @{version} {map_file}", chunk)
        async with self.api.session() as s:
            await s.command(f"commit map @{version} {map_file}")


__all__ = ["DecisionTable", "PublishReport", "TablePublisher", "chunks", "write_atomically"]
