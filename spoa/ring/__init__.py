"""Consistent hashing from sticky keys to members: the same answer on every replica.

Owns: `Ring` (immutable; build a new one when the members change), `hash_key`, and the table fill.
Layout: `hashing` (deterministic hashes), `table` (which member owns each slot), `ring` (lookups,
fallback order, shares). docs/ring.md explains the choice of algorithm with measurements.

Must not: know about DNS, HAProxy, cookies or health; the caller decides which members are on the
ring (or which to exclude per lookup).
"""

from spoa.ring.hashing import TABLE_BITS, TABLE_SIZE, hash_key, slot_of
from spoa.ring.ring import FALLBACK_PROBES, EmptyRingError, Ring, moved_fraction
from spoa.ring.table import fill_table, load_cap

__all__ = [
    "FALLBACK_PROBES",
    "TABLE_BITS",
    "TABLE_SIZE",
    "EmptyRingError",
    "Ring",
    "fill_table",
    "hash_key",
    "load_cap",
    "moved_fraction",
    "slot_of",
]
