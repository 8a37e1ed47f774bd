"""Ring benchmark (not a test): prints the figures docs/ring.md quotes.

For each N: peak/mean load over random keys, keys moved when one member is added and when one is
removed (as a multiple of 1/N), lookup time per call (hashing included), and build time.

    .venv/bin/python bench/ring.py                     # spoa.ring, 1M keys, N = 3 10 30 100 1000
    .venv/bin/python bench/ring.py --trials 5          # movement over 5 member sets (mean and max)
    .venv/bin/python bench/ring.py --compare           # also Maglev, HAProxy-like ring, rendezvous,
                                                       # multi-probe (fewer keys for the slow ones)
    .venv/bin/python bench/ring.py --keys 200000 --sizes 10,100
    .venv/bin/python bench/ring.py --only maglev,mpch
    .venv/bin/python bench/ring.py --key-sets src16,ids  # realistic keys (default: every set)

Key sets (the ring hashes keys with CRC-32, which HAProxy computes too, so the spread depends on
what keys look like; each set is reported on its own):
- random:   random 24-character hex strings (the bench's historical keys);
- src16:    every source address of a /16 (10.1.0.0/16), as the 4 bytes HAProxy's `src` hashes;
- ids:      sequential numeric user ids in a header: b"1", b"2", ... ;
- sessions: random session strings (22 characters of URL-safe base64, as a 128-bit session id);
- ipv6:     random IPv6 sources, 16 bytes each (addresses of a few /64s with random host parts).

Targets (shared/DESIGN.md): peak/mean ≤ 1.05 over 1M keys for N in 3..100; moved ≤ 1.2/N;
lookup p99 ≤ 10 µs; build ≤ 50 ms at N = 1000. Timings are CPU time on this machine, best of
`--repeat` builds; other processes running at the same time make them noisier, not faster.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b, shake_128

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.member import Member
from spoa.ring import Ring, hash_key

Lookup = Callable[[bytes], Member]


@dataclass
class Algorithm:
    """How to build a ring over members, returning its key → member function."""

    name: str
    build: Callable[[Sequence[Member]], Lookup]
    keys_divisor: int = 1  # slow lookups run over keys // keys_divisor


# ---------------------------------------------------------------- algorithms compared

def ours(members: Sequence[Member]) -> Lookup:
    return Ring(members).lookup


def _h64(data: bytes, person: bytes = b"") -> int:
    return int.from_bytes(blake2b(data, digest_size=8, person=person).digest(), "big")


def maglev(members: Sequence[Member], size: int = 65537) -> Lookup:
    """Maglev (Eisenbud et al., 2016): a member that finds its next slot taken moves on at once."""
    ms = sorted(set(members), key=lambda m: m.key)
    n = len(ms)
    offset = [_h64(m.key, b"off") % size for m in ms]
    skip = [_h64(m.key, b"skip") % (size - 1) + 1 for m in ms]
    pos = offset[:]
    table = [-1] * size
    filled = 0
    while filled < size:
        for i in range(n):
            c, k = pos[i], skip[i]
            while table[c] >= 0:
                c = (c + k) % size
            table[c] = i
            pos[i] = (c + k) % size
            filled += 1
            if filled == size:
                break
    owners = tuple(ms[i] for i in table)
    return lambda key: owners[_h64(key) % size]


def point_ring(points_per_member: int) -> Callable[[Sequence[Member]], Lookup]:
    """A classic ring with points per member; HAProxy's `hash-type consistent` uses 16."""
    def build(members: Sequence[Member]) -> Lookup:
        pts = sorted((_h64(m.key + b"#%d" % v, b"pt"), m) for m in set(members)
                     for v in range(points_per_member))
        pos = [p for p, _ in pts]
        own = [m for _, m in pts]
        n = len(pos)
        return lambda key: own[bisect.bisect_left(pos, _h64(key)) % n]
    return build


def rendezvous(members: Sequence[Member]) -> Lookup:
    """Highest random weight: perfect balance and movement, N hashes per lookup."""
    ms = [(m, m.key) for m in set(members)]
    return lambda key: max(ms, key=lambda mk: _h64(key + mk[1]))[0]


def multi_probe(probes: int) -> Callable[[Sequence[Member]], Lookup]:
    """Multi-probe consistent hashing (Appleton & O'Reilly 2015), one point per member."""
    def build(members: Sequence[Member]) -> Lookup:
        pts = sorted((_h64(m.key, b"pt"), m) for m in set(members))
        pos = [p for p, _ in pts] + [pts[0][0] + (1 << 64)]
        own = [m for _, m in pts] + [pts[0][1]]

        def lookup(key: bytes) -> Member:
            best, who = 1 << 65, own[0]
            for p in memoryview(shake_128(key).digest(8 * probes)).cast("Q"):
                i = bisect.bisect_left(pos, p)
                if pos[i] - p < best:
                    best, who = pos[i] - p, own[i]
            return who
        return lookup
    return build


ALGORITHMS = {
    "ours": Algorithm("spoa.ring (rendezvous race, 2^16 slots, 1.5 % load cap)", ours),
    "maglev": Algorithm("Maglev, 65537 slots", maglev),
    "ring16": Algorithm("ring, 16 points/member (HAProxy consistent)", point_ring(16), 4),
    "ring160": Algorithm("ring, 160 points/member", point_ring(160), 4),
    "mpch": Algorithm("multi-probe, 21 probes, 1 point/member", multi_probe(21), 10),
    "hrw": Algorithm("rendezvous (N hashes per lookup)", rendezvous, 20),
}
NAMES = tuple(ALGORITHMS)


# ---------------------------------------------------------------- measurements

def make_members(n: int, rng: random.Random) -> list[Member]:
    out: set[Member] = set()
    while len(out) < n:
        out.add(Member(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 80))
    return sorted(out)


def peak_over_mean(lookup: Lookup, keys: Sequence[bytes], n: int) -> float:
    counts = Counter(map(lookup, keys))
    return max(counts.values()) * n / len(keys)


def moved(a: Lookup, b: Lookup, keys: Sequence[bytes]) -> float:
    return sum(1 for k in keys if a(k) != b(k)) / len(keys)


def lookup_times_us(lookup: Lookup, keys: Sequence[bytes]) -> tuple[float, float]:
    """p50 and p99 of single calls, timer overhead included (so a little pessimistic)."""
    clock = time.perf_counter_ns
    samples = []
    for k in keys:
        t0 = clock()
        lookup(k)
        samples.append(clock() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[len(samples) * 99 // 100] / 1000


def build_ms(build: Callable[[Sequence[Member]], Lookup], members: Sequence[Member], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        build(members)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def key_set(name: str, nkeys: int, seed: int) -> list[bytes]:
    """The keys of one named set (see the module docstring)."""
    rng = random.Random(seed)
    if name == "random":
        return [rng.randbytes(12).hex().encode() for _ in range(nkeys)]
    if name == "src16":
        return [bytes((10, 1, i >> 8, i & 255)) for i in range(1 << 16)]
    if name == "ids":
        return [str(i).encode() for i in range(1, nkeys + 1)]
    if name == "sessions":
        return [base64.urlsafe_b64encode(rng.randbytes(16)).rstrip(b"=") for _ in range(nkeys)]
    if name == "ipv6":
        prefixes = [bytes.fromhex("20010db8") + rng.randbytes(4) for _ in range(4)]
        return [rng.choice(prefixes)[:8] + rng.randbytes(8) for _ in range(nkeys)]
    raise SystemExit(f"unknown key set {name!r}; expected one of {', '.join(KEY_SETS)}")


KEY_SETS = ("random", "src16", "ids", "sessions", "ipv6")


def run(algo: Algorithm, sizes: Sequence[int], nkeys: int, trials: int, repeat: int, seed: int,
        key_set_name: str = "random") -> None:
    keys = key_set(key_set_name, nkeys // algo.keys_divisor, seed)
    timing_keys = keys[:100_000]
    print(f"\n{algo.name}: {len(keys):,} {key_set_name} keys, {trials} member set(s) per N")
    print(f"{'N':>5} {'peak/mean':>9} {'add x 1/N':>17} {'remove x 1/N':>17} "
          f"{'lookup p50':>10} {'p99 µs':>7} {'build ms':>9}")
    for n in sizes:
        peaks: list[float] = []
        adds: list[float] = []
        removes: list[float] = []
        for t in range(trials):
            trial_rng = random.Random(seed * 1000 + n * 10 + t)
            base = make_members(n + 1, trial_rng)
            newcomer = base.pop(trial_rng.randrange(len(base)))
            victim = trial_rng.choice(base)
            ring = algo.build(base)
            peaks.append(peak_over_mean(ring, keys, n))
            adds.append(moved(ring, algo.build([*base, newcomer]), keys) * n)
            removes.append(moved(ring, algo.build([m for m in base if m != victim]), keys) * n)
        members = make_members(n, random.Random(seed + n))
        p50, p99 = lookup_times_us(algo.build(members), timing_keys)
        ms = build_ms(algo.build, members, repeat)

        def spread(xs: list[float]) -> str:
            return f"{statistics.mean(xs):.3f} (max {max(xs):.3f})" if len(xs) > 1 else f"{xs[0]:.3f}"
        print(f"{n:>5} {max(peaks):>9.3f} {spread(adds):>17} {spread(removes):>17} "
              f"{p50:>10.2f} {p99:>7.2f} {ms:>9.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--sizes", default="3,10,30,100,1000")
    ap.add_argument("--trials", type=int, default=1, help="member sets per N for peak and movement")
    ap.add_argument("--repeat", type=int, default=5, help="builds timed per N (best is shown)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compare", action="store_true", help="also run the algorithms we did not choose")
    ap.add_argument("--only", default="", help="comma-separated names among: " + ", ".join(NAMES))
    ap.add_argument("--key-sets", default=",".join(KEY_SETS),
                    help="comma-separated key sets among: " + ", ".join(KEY_SETS))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    hash_key(b"warm-up")
    algos = [ALGORITHMS["ours"]]
    if args.compare:
        algos = list(ALGORITHMS.values())
    if args.only:
        algos = [ALGORITHMS[name] for name in args.only.split(",")]
    for name in args.key_sets.split(","):
        for algo in algos:
            run(algo, sizes, args.keys, args.trials, args.repeat, args.seed, name)


if __name__ == "__main__":
    main()
