"""Filling the lookup table: which member owns each slot, as a pure function of the member set.

Owns: the fill algorithm, a rendezvous race with bounded loads. Each member walks the table on its
own pseudo-random permutation (`member_walk`: start + t*step). In round t every member, in sorted
order, looks at the t-th slot of its walk and claims it if the slot is still free and the member
holds fewer than `cap` slots, cap = ceil(size * (1 + SLACK) / n). The race goes on until every
slot is owned.

Why this and not Maglev: without caps the race is rendezvous hashing per slot (a slot goes to the
member whose walk reaches it first), so one member more or less moves only that member's slots;
the caps, with a little slack, keep the peak load within 1 + SLACK of the mean, and they are what
moves a few slots more than the minimum. Maglev's fill (a member that finds its slot taken moves
on within the same round) is perfectly balanced but moved 1.58/N of the keys at N=100 where this
moves ~1.1/N; docs/ring.md has the figures.

Speed: the plain race costs about size * ln(size) probes, most of them in the tail, when many
members hunt for the last free slots. Once few slots are free (free * members small), the tail is
computed exactly instead: for each free slot, the member whose walk reaches it first is found with
modular arithmetic, and claims are replayed in (round, member) order with a heap. The result is
identical to the plain race (tests check it for random sets and switch points).

Must not: depend on the order members are given, on Python's `hash()`, on floats, or on anything
but the set of member keys and the constants here; those constants are part of the mapping replicas
agree on (see `hashing`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from spoa.ring.hashing import TABLE_BITS, member_walk

# Load cap = ceil(size * (1 + SLACK_NUM / SLACK_DEN) / n): peak/mean of slots ≤ 1.015 (+ rounding).
SLACK_NUM = 15
SLACK_DEN = 1000
# Switch from the race to the exact tail once free_slots * (active_members + TAIL_OVERHEAD) is at
# most TAIL_BUDGET: both are probe-sized units of work, measured on CPython 3.11.
TAIL_BUDGET = 1 << 15
TAIL_OVERHEAD = 64


def load_cap(n: int, size: int) -> int:
    """The most slots one of n members may own in a table of `size` slots."""
    return -(-(size * (SLACK_DEN + SLACK_NUM)) // (SLACK_DEN * n))


def fill_table(member_keys: Sequence[bytes], table_bits: int = TABLE_BITS,
               tail_budget: int = TAIL_BUDGET) -> list[int]:
    """The owner of every slot, as an index into `member_keys`.

    `member_keys` must be sorted and distinct (the caller owns the canonical order); at least one.
    `tail_budget` only changes the speed, never the result.
    """
    n = len(member_keys)
    if n == 0:
        raise ValueError("fill_table needs at least one member")
    size = 1 << table_bits
    if n == 1:
        return [0] * size
    mask = size - 1
    walks = [member_walk(k, table_bits) for k in member_keys]
    pos = [start for start, _ in walks]
    steps = [step for _, step in walks]
    cap = load_cap(n, size)
    count = [0] * n
    table = [-1] * size
    filled = 0
    active = list(range(n))

    # The race, one round per pass: every active member probes the next slot of its walk.
    while (size - filled) * (len(active) + TAIL_OVERHEAD) > tail_budget:
        capped = False
        for i in active:
            s = pos[i]
            if table[s] < 0:
                table[s] = i
                filled += 1
                c = count[i] = count[i] + 1
                if c == cap:
                    capped = True
            pos[i] = (s + steps[i]) & mask
        if capped:
            active = [i for i in active if count[i] < cap]

    if filled < size:
        _exact_tail(table, size - filled, active, pos, steps, count, cap, mask)
    return table


def _exact_tail(table: list[int], free: int, active: list[int], pos: list[int], steps: list[int],
                count: list[int], cap: int, mask: int) -> None:
    """Finish the race exactly: every active member has done the same number of rounds."""
    size = mask + 1
    # Member i reaches slot s after ((s - pos_i) * step_i^-1) mod size more rounds = (s*b + a) & mask.
    live = list(active)
    coef = [((-pos[i] * pow(steps[i], -1, size)) & mask, pow(steps[i], -1, size)) for i in live]

    def first_arrival(s: int) -> tuple[int, int]:
        rounds = [(s * b + a) & mask for a, b in coef]
        t = min(rounds)
        return t, live[rounds.index(t)]  # ties: the lower index probes first within a round

    heap: list[tuple[int, int, int]] = []
    s = -1
    find = table.index
    for _ in range(free):
        s = find(-1, s + 1)
        t, i = first_arrival(s)
        heap.append((t, i, s))
    heapq.heapify(heap)
    while heap:
        t, i, s = heapq.heappop(heap)
        c = count[i]
        if c < cap:
            table[s] = i
            count[i] = c + 1
            if c + 1 == cap:
                j = live.index(i)
                del live[j]
                del coef[j]
        else:
            # Its first visitor filled up earlier in the race: the next visitor that still can.
            t, i = first_arrival(s)
            heapq.heappush(heap, (t, i, s))


__all__ = ["SLACK_DEN", "SLACK_NUM", "fill_table", "load_cap"]
