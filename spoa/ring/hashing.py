"""The ring's hash functions: sticky keys and members to integers, the same in every process.

Owns: `hash_key` (a sticky key's hash: CRC-32, whose high TABLE_BITS bits are its table slot) and
`member_walk` (where a member starts and how far it steps through the table when the table is
filled, BLAKE2b with a fixed personalisation). Every HAProxy replica, restarted or not, on any
platform, computes the same numbers; Python's `hash()` is never used (it is salted per process).

Why CRC-32 for keys: HAProxy computes it too. `<fetch>,crc32,div(65536)` in haproxy.cfg is
`slot_of` bit for bit (HAProxy's `crc32` converter is zlib's CRC-32, on HAProxy 2.6 and 3.4, for a
string's bytes and for `src` as its 4 or 16 address bytes; tests/test_table_haproxy.py proves it on
the HAProxy under test), so HAProxy looks a key's slot up in the table the agent publishes
without asking the agent. The HIGH 16 bits, not the low ones: CRC-32 is linear, and over the
65,536 sources of a /16 its low 16 bits take only 32,768 values (every used slot twice, half the
slots never), while its high 16 bits take all 65,536: each source of a /16 its own slot, so a
/16's sources spread exactly as the table does (bench/ring.py, key set src16). CRC-32 is not a
cryptographic hash: a client can pick a key for a given slot, which only chooses among current
members, as any key does.

Must not: change silently. These functions are part of the mapping key → member that replicas
agree on without talking to each other; changing one (or TABLE_BITS) remaps keys between agents
of different versions. tests/test_ring.py pins them with known values.
"""

from __future__ import annotations

from hashlib import blake2b
from zlib import crc32

# The table has 2**TABLE_BITS slots; a key's slot is the high TABLE_BITS bits of its 32-bit hash
# (haproxy.cfg: `crc32,div(65536)`; changing TABLE_BITS means changing haproxy.cfg too).
TABLE_BITS = 16
TABLE_SIZE = 1 << TABLE_BITS
SLOT_SHIFT = 32 - TABLE_BITS

_MEMBER_PERSON = b"hxswarm-member"
_from_bytes = int.from_bytes

hash_key = crc32
"""A sticky key's 32-bit hash: CRC-32 as zlib (and HAProxy's `crc32` converter) computes it."""


def slot_of(key: bytes) -> int:
    """The table slot of a sticky key: the high TABLE_BITS bits of `hash_key` (HAProxy:
    `crc32,div(65536)`)."""
    return crc32(key) >> SLOT_SHIFT


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
