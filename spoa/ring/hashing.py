"""The ring's hash functions: sticky keys and members to integers, the same in every process.

Owns: `hash_key` (a sticky key's 64-bit hash, whose top TABLE_BITS bits pick a table slot) and
`member_walk` (where a member starts and how far it steps through the table when the table is
filled). Both are BLAKE2b (members with a fixed personalisation), so every HAProxy replica, restarted or
not, on any platform, computes the same numbers; Python's `hash()` is never used (it is salted per
process).

Must not: change silently. These functions are part of the mapping key → member that replicas
agree on without talking to each other; changing one (or TABLE_BITS) remaps keys between agents
of different versions. tests/test_ring.py pins them with known values.
"""

from __future__ import annotations

from hashlib import blake2b

# The table has 2**TABLE_BITS slots; a key's slot is the top TABLE_BITS bits of its hash.
TABLE_BITS = 16
TABLE_SIZE = 1 << TABLE_BITS
SLOT_SHIFT = 64 - TABLE_BITS

_MEMBER_PERSON = b"hxswarm-member"
_from_bytes = int.from_bytes


_KEY_HASH = blake2b(digest_size=8)  # never updated itself: only copied


def hash_key(key: bytes) -> int:
    """A sticky key's 64-bit hash: BLAKE2b-64, big-endian (about 0.25 µs for a short key).

    No personalisation: it costs 15 % of a lookup, and member hashes have their own. Copying an
    initialised state is cheaper than `blake2b(key, digest_size=8)` (no keyword parsing, no
    parameter block), with the same digest.
    """
    h = _KEY_HASH.copy()
    h.update(key)
    return _from_bytes(h.digest(), "big")


def slot_of(key: bytes) -> int:
    """The table slot of a sticky key: the top TABLE_BITS bits of `hash_key`."""
    return hash_key(key) >> SLOT_SHIFT


def member_walk(member_key: bytes, table_bits: int = TABLE_BITS) -> tuple[int, int]:
    """(start, step) of a member's walk over a table of 2**table_bits slots.

    The step is odd, hence coprime with the power-of-two table size: the walk
    start, start + step, start + 2*step, ... (mod size) visits every slot exactly once.
    """
    digest = blake2b(member_key, digest_size=16, person=_MEMBER_PERSON).digest()
    mask = (1 << table_bits) - 1
    start = _from_bytes(digest[:8], "big") & mask
    step = (_from_bytes(digest[8:], "big") & mask) | 1
    return start, step


__all__ = ["SLOT_SHIFT", "TABLE_BITS", "TABLE_SIZE", "hash_key", "member_walk", "slot_of"]
