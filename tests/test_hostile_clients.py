"""Hostile HTTP clients through the real product: 10,000 requests with random, huge, binary and
non-UTF-8 cookie, header and query values.

The stack is real (`haproxy-swarm run` with the shipped haproxy.cfg, HAProxy 2.6 or 3.4 by HAPROXY_BIN, the agent,
dnsmasq, three backends) with STICKY_KEY=cookie:SWARMID,header:X-User,param:u,src, so every kind of
key reaches the agent. Requests are written on raw sockets (http.client refuses most of these bytes)
from 16 concurrent clients, keep-alive when HAProxy allows it.

What is right, request by request:
- HAProxy itself refuses what HTTP does not allow - a request head beyond its buffer (64 KiB
  values), bytes outside visible ASCII in the request line (raw non-ASCII, controls, space, '#') -
  with its own 400 (HAProxy 2.6 answers 400 for an oversized head; 3.x may answer 431), and on
  HAProxy 3.x a NUL byte in any header or cookie value (RFC 9110 5.5: a recipient MUST reject it or
  replace it with SP; 3.x rejects with 400, 2.6 forwards it): no backend answers those, and that is
  HAProxy's job, not a failure of ours;
- everything else is answered 200 by a member (X-Served-By is one of the members), including
  control bytes and non-UTF-8 in header and cookie values (and NUL on 2.6);
- a Set-Cookie, when there is one, is the sticky cookie of a member: nothing from the client is ever
  reflected into it; a forged cookie that is the real cookie of a member routes to that member (it
  is a valid session), any other cookie value is ignored and a fresh one issued.
And for the agent: no handler error, no SPOP protocol error, the same pid at the end, VmRSS flat.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from spoa.haproxy.process import haproxy_version
from spoa.local.stack import Stack
from spoa.member import Member
from spoa.routing import cookie_value

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

REQUESTS = 10_000
CLIENTS = 16
SECRET = "test-secret"  # COOKIE_SECRET of Stack
SMALL_HEAD = 14_000  # at most this: HAProxy 2.6 must take it (its buffer holds ~15 KiB of head)
HUGE = 64 * 1024
RSS_GROWTH_MB = 10.0


@dataclass(frozen=True)
class Case:
    raw: bytes
    must_refuse: bool  # HAProxy must refuse it itself (oversized head or invalid request line)
    cookie_member: str | None = None  # the member address a forged-but-valid cookie names
    kinds: tuple[str, ...] = ()


@dataclass
class Answer:
    status: int
    served_by: str | None
    set_cookie: str | None
    error: str = ""


# --------------------------------------------------------------------------- the hostile values


INVALID_UTF8 = (b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",
                b"\xff\xfe", b"\xfe\xff\x00\x00", b"\x80")
CONTROLS = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])  # all but TAB, CR, LF
NOT_CRLF = bytes(b for b in range(256) if b not in (10, 13))


class Hostile:
    """A seeded source of hostile values and whole requests."""

    def __init__(self, seed: int, members: list[Member], refuses_nul: bool) -> None:
        self.rng = random.Random(seed)
        self.cookies = {cookie_value(m, SECRET): m.address for m in members}
        self.refuses_nul = refuses_nul  # HAProxy refuses a NUL in a header value itself (3.x)

    def pick(self, data: bytes, n: int) -> bytes:
        return bytes(self.rng.choice(data) for _ in range(n))

    def value(self, where: str) -> tuple[bytes, str]:
        """A value for a header, cookie or query parameter, and what kind it is. In the query, only
        'uri-*' kinds put bytes HAProxy refuses in the request line."""
        r = self.rng
        kind = r.choice(["ascii", "high", "utf8", "invalid-utf8", "controls", "binary", "big", "huge", "empty",
                         "separators"])
        if kind == "ascii":
            v = self.pick(bytes(range(0x21, 0x7F)), r.randrange(1, 100))
        elif kind == "high":
            v = self.pick(bytes(range(0x80, 0x100)), r.randrange(1, 100))
        elif kind == "utf8":
            v = "ünïcödé ☃ 𝄞 ".encode() * r.randrange(1, 10)
        elif kind == "invalid-utf8":
            v = b"".join(r.choice(INVALID_UTF8) for _ in range(r.randrange(1, 20)))
        elif kind == "controls":
            v = self.pick(CONTROLS, r.randrange(1, 50))
        elif kind == "binary":
            v = self.pick(NOT_CRLF, r.randrange(1, 300))
        elif kind == "big":
            v = self.pick(bytes(range(0x21, 0x7F)), r.randrange(1000, 4000))
        elif kind == "huge":
            v = b"h" * HUGE
        elif kind == "empty":
            v = b""
        else:
            v = r.choice([b";", b"=", b";;==", b'"quoted"', b"a=b; c=d", b",", b"SWARMID=", b"\t \t"])
        if where == "query" and kind != "huge":
            if kind == "separators" or r.random() < 0.7:  # as a browser sends it: percent-encoded
                v = b"".join(b"%%%02X" % c if c < 0x21 or c > 0x7E or c in b"#%& " else bytes([c]) for c in v)
                v += r.choice([b"", b"%", b"%zz", b"%0", b"%00"])
                kind = "encoded-" + kind
            elif any(c < 0x21 or c > 0x7E or c == 0x23 for c in v):
                kind = "uri-" + kind  # raw: HAProxy must refuse the request line
        return v, kind

    def case(self) -> Case:
        r = self.rng
        kinds: list[str] = []
        query = b""
        headers: list[bytes] = []
        cookie_member = None
        if r.random() < 0.8:
            v, k = self.value("query")
            kinds.append("q:" + k)
            query = b"?" + r.choice([b"u=", b"x=1&u=", b"u=a&u="]) + v
        if r.random() < 0.8:
            v, k = self.value("header")
            kinds.append("h:" + k)
            headers.append(b"X-User: " + v)
        if r.random() < 0.8:
            roll = r.random()
            if roll < 0.15:  # a forged cookie that is the real cookie of a member: a valid session
                value, cookie_member = r.choice(sorted(self.cookies.items()))
                v, k = value.encode(), "member"
            elif roll < 0.25:
                v, k = bytes(r.choice(b"0123456789abcdef") for _ in range(20)), "hex20"
            else:
                v, k = self.value("cookie")
            kinds.append("c:" + k)
            jar = [b"SWARMID=" + v]
            if r.random() < 0.3:  # a plain cookie beside it (a '"' in it would swallow the rest of the header)
                jar.insert(r.randrange(2), b"other=" + self.pick(b"abcdefghijklmnopqrstuvwxyz0123456789", 20))
            headers.append(b"Cookie: " + b"; ".join(jar))
            if r.random() < 0.1:
                headers.append(b"Cookie: SWARMID=" + self.value("cookie")[0][:100])  # a second Cookie header
                cookie_member = None  # which one HAProxy takes first is its business
        for _ in range(r.randrange(3)):
            headers.append(b"X-Junk-" + str(r.randrange(100)).encode() + b": " + self.value("header")[0][:200])
        r.shuffle(headers)
        head = b"GET /" + query + b" HTTP/1.1\r\nHost: hostile\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        must_refuse = (len(head) > HUGE or any(k.startswith("q:uri-") for k in kinds)
                       or (self.refuses_nul and any(b"\0" in h for h in headers)))
        if not must_refuse and len(head) > SMALL_HEAD:
            return self.case()  # between what HAProxy must take and must refuse: not generated
        return Case(head, must_refuse, cookie_member if not must_refuse else None, tuple(kinds))


# --------------------------------------------------------------------------- a raw HTTP/1.1 client


async def read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """(the answer, whether the connection may be reused)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    length = int(fields.get("content-length", "0"))
    await reader.readexactly(length)
    keep = "close" not in fields.get("connection", "").lower()
    return Answer(status, fields.get("x-served-by"), fields.get("set-cookie")), keep


async def client(port: int, source: str, cases: list[Case], answers: dict[int, Answer],
                 queue: asyncio.Queue[int]) -> None:
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            break
        for attempt in range(2):
            fresh = conn is None
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), limit=1 << 20)
            reader, writer = conn
            try:
                writer.write(cases[i].raw)
                await writer.drain()
                answer, keep = await asyncio.wait_for(read_answer(reader), 10)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                writer.close()
                conn = None
                if not fresh and attempt == 0:
                    continue  # HAProxy closed an idle keep-alive connection: resend once on a new one
                answer, keep = Answer(0, None, None, f"{type(e).__name__}: {e}"), False
            if not keep and conn is not None:
                conn[1].close()
                conn = None
            answers[i] = answer
            break
    if conn is not None:
        conn[1].close()


async def run(port: int, cases: list[Case]) -> dict[int, Answer]:
    answers: dict[int, Answer] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(cases)):
        queue.put_nowait(i)
    await asyncio.gather(*(client(port, f"127.8.{c}.{c + 1}", cases, answers, queue) for c in range(CLIENTS)))
    return answers


# --------------------------------------------------------------------------- the test


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def stack() -> Iterator[Stack]:
    with Stack(n_slots=3, env={"STICKY_KEY": "cookie:SWARMID,header:X-User,param:u,src"}) as s:
        yield s


def test_ten_thousand_hostile_requests(stack: Stack) -> None:
    members = [Member.parse(t.ip, t.port) for t in stack.tasks]
    addresses = {m.address for m in members}
    issued = {f"SWARMID={cookie_value(m, SECRET)}" for m in members}
    hostile = Hostile(20240607, members, refuses_nul=haproxy_version() >= (3, 0))
    cases = [hostile.case() for _ in range(REQUESTS)]
    pid = stack.agent_pid()
    assert pid is not None

    warm = asyncio.run(run(stack.traffic_port, [Case(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n", False)] * 200))
    assert all(a.status == 200 for a in warm.values())
    rss_before = rss_mb(pid)
    decisions_before = stack.metric("haproxy_swarm_decisions_total")

    answers = asyncio.run(run(stack.traffic_port, cases))

    assert len(answers) == REQUESTS
    wrong: list[str] = []
    outcome: Counter[str] = Counter()
    for i, case in enumerate(cases):
        a = answers[i]
        what = f"#{i} {case.kinds} -> {a.status} {a.served_by} {a.error}"
        if case.must_refuse:
            outcome["refused by HAProxy"] += 1
            if a.status not in (400, 414, 431) or a.served_by is not None:
                wrong.append("should be HAProxy's refusal: " + what)
            continue
        outcome["200 from a member"] += 1
        if a.status != 200 or a.served_by not in addresses:
            wrong.append("should be 200 from a member: " + what)
        if a.set_cookie is not None and a.set_cookie.split(";", 1)[0] not in issued:
            wrong.append(f"Set-Cookie not a member's cookie: {a.set_cookie!r} " + what)
        if case.cookie_member is not None and a.served_by != case.cookie_member:
            wrong.append(f"a member's cookie ({case.cookie_member}) routed elsewhere: " + what)
    kinds = Counter(k.split(":", 1)[1].removeprefix("encoded-").removeprefix("uri-") for c in cases for k in c.kinds)
    print(f"\n{REQUESTS} hostile requests: {dict(outcome)}; value kinds {dict(kinds)}")
    assert not wrong, f"{len(wrong)} wrong answers, first ones: {wrong[:10]}"

    # The agent: no error, no restart, memory flat, and it did decide these requests.
    decided = stack.metric("haproxy_swarm_decisions_total") - decisions_before
    rss_after = rss_mb(pid)
    print(f"agent: {decided:.0f} decisions, RSS {rss_before:.1f} -> {rss_after:.1f} MB")
    assert stack.metric("haproxy_swarm_handler_errors_total") == 0
    assert stack.metric("haproxy_swarm_spop_protocol_errors_total") == 0
    assert stack.agent_pid() == pid
    assert rss_after - rss_before < RSS_GROWTH_MB
    # Every 200 is a decision, counted whether HAProxy made it from the table (or the cookie map)
    # or the agent over SPOE.
    assert decided >= 0.95 * outcome["200 from a member"]
