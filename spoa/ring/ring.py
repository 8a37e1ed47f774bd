"""The ring: an immutable consistent-hash table from sticky keys to members.

Owns: the member set's lookup table (2**16 slots, filled by `table.fill_table`), the per-request
lookup, the fallback order that skips excluded members, and each member's share of the key space.

Must not: log, lock, or keep per-key state; change after it is built (build a new ring on a
membership change and swap it in); know about DNS, HAProxy or cookies.

Contract, measured by bench/ring.py (docs/ring.md has the figures):
- Every replica maps a key to the same member: the table is a pure function of the member set,
  whatever the order members are given in or the process that builds it.
- Load: no member owns more than ceil(1.015 * 65536 / N) slots (peak/mean ≤ 1.015 + rounding).
- Movement: adding or removing one member moves about 1/N of the keys (≤ 1.2/N up to N=100).
- `lookup` is one CRC-32 and one tuple index (~0.2 µs); building is ~20 ms (N ≤ 100), ~40 ms
  (N = 1000) of CPU on the caller's thread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Iterable, Iterator, Sequence
from operator import ne
from typing import overload
from zlib import crc32

from spoa.member import Member
from spoa.ring.hashing import SLOT_SHIFT, TABLE_SIZE, hash_key
from spoa.ring.table import fill_table

# Slots tried by `lookup_excluding` before it falls back to rendezvous over the remaining members.
FALLBACK_PROBES = 32
_MASK64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407
_PROBE_SHIFT = 64 - 16  # a probe's slot: the top TABLE_BITS bits of the 64-bit LCG state


class EmptyRingError(LookupError):
    """`lookup` on a ring without members: there is nowhere to send the request."""


class _EmptyTable(Sequence[Member]):
    """The table of an empty ring: every index raises EmptyRingError (no branch on the hot path)."""

    @overload
    def __getitem__(self, index: int) -> Member: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Member]: ...
    def __getitem__(self, index: int | slice) -> Member | Sequence[Member]:
        raise EmptyRingError("the ring has no members")

    def __len__(self) -> int:
        return 0


class Ring:
    """Consistent hashing over a set of members (by `Member.key`, i.e. `ip:port`)."""

    __slots__ = ("_members", "_set", "_shares", "_table")

    def __init__(self, members: Iterable[Member] = ()) -> None:
        unique = sorted(set(members), key=lambda m: m.key)
        self._members: tuple[Member, ...] = tuple(unique)
        self._set: frozenset[Member] = frozenset(unique)
        self._shares: dict[Member, float] | None = None
        if unique:
            owners = fill_table([m.key for m in unique])
            self._table: Sequence[Member] = tuple(map(self._members.__getitem__, owners))
        else:
            self._table = _EmptyTable()

    # ------------------------------------------------------------------ hot path

    def lookup(self, key: bytes) -> Member:
        """The member for a sticky key. Raises EmptyRingError when the ring has no members."""
        return self._table[crc32(key) >> SLOT_SHIFT]

    def lookup_hash(self, h: int) -> Member:
        """The member for a key already hashed with `hash_key`."""
        return self._table[h >> SLOT_SHIFT]

    def lookup_excluding(self, key: bytes, excluded: Container[Member]) -> Member | None:
        """The member for a key, skipping `excluded` ones (e.g. marked DOWN); None if none is left.

        A key whose member is not excluded gets exactly `lookup(key)`, so excluding a member moves
        only that member's keys, and they come back when it is no longer excluded. The others
        follow a fixed per-key sequence of further slots, so the excluded member's keys spread
        over the rest in proportion to their shares, the same way on every replica.
        """
        return self.lookup_hash_excluding(hash_key(key), excluded)

    def lookup_hash_excluding(self, h: int, excluded: Container[Member]) -> Member | None:
        table = self._table
        if not self._members:
            return None
        member = table[h >> SLOT_SHIFT]
        if member not in excluded:
            return member
        x = h
        for _ in range(FALLBACK_PROBES):
            x = (x * _LCG_MUL + _LCG_INC) & _MASK64
            member = table[x >> _PROBE_SHIFT]
            if member not in excluded:
                return member
        # Most of the ring is excluded: rendezvous over whoever is left (rare, O(N)).
        seed = (h & ((1 << 64) - 1)).to_bytes(8, "big")
        left = [m for m in self._members if m not in excluded]
        if not left:
            return None
        return max(left, key=lambda m: hash_key(seed + m.key))

    # ------------------------------------------------------------------ inspection

    @property
    def members(self) -> tuple[Member, ...]:
        """The members, sorted by key."""
        return self._members

    @property
    def table(self) -> Sequence[Member]:
        """The lookup table: TABLE_SIZE slots, slot = `slot_of(key)` (empty if no members)."""
        return self._table

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def __contains__(self, member: object) -> bool:
        return member in self._set

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members)

    def __repr__(self) -> str:
        return f"Ring({len(self._members)} members)"

    def shares(self) -> dict[Member, float]:
        """Each member's share of the key space (0..1, summing to 1; empty for an empty ring)."""
        if self._shares is None:
            counts = Counter(self._table) if self._members else Counter[Member]()
            self._shares = {m: counts[m] / TABLE_SIZE for m in self._members}
        return dict(self._shares)


def moved_fraction(before: Ring, after: Ring) -> float:
    """The fraction of the key space whose member differs between two rings (1.0 if one is empty)."""
    if not before or not after:
        return 0.0 if not before and not after else 1.0
    moved: int = sum(map(ne, before.table, after.table))
    return moved / TABLE_SIZE


__all__ = ["FALLBACK_PROBES", "EmptyRingError", "Ring", "moved_fraction"]
