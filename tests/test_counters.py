"""spoa.haproxy.counters: HAProxy's own decisions read from `show table fe_main` (both versions'
formats) and totals that only grow across reloads and agent restarts."""

from __future__ import annotations

from spoa.haproxy.counters import DecisionCounts, parse_counts

# Captured from HAProxy 2.6.12 and 3.4.7 (3.x adds `shard=`).
ANSWER_26 = """# table: fe_main, type: string, size:16, used:2
0x7fe920043818: key=cookie use=0 exp=0 gpc0=0 http_req_cnt=7
0x55c335489d08: key=src use=0 exp=0 gpc0=3 http_req_cnt=30

"""
ANSWER_34 = """# table: fe_main, type: string, size:16, used:2
0x7f8ae5e6d208: key=src use=0 exp=0 shard=0 gpc0=3 http_req_cnt=30
0x7f8ae647b468: key=header use=0 exp=0 shard=0 gpc0=0 http_req_cnt=1

"""


def test_both_versions_answers_parse() -> None:
    assert parse_counts(ANSWER_26) == {"cookie": (7, 0), "src": (30, 3)}
    assert parse_counts(ANSWER_34) == {"src": (30, 3), "header": (1, 0)}
    assert parse_counts("") == {}
    assert parse_counts("0x1: key=src use=0 http_req_cnt=x gpc0=1\n") == {}


def test_totals_start_at_the_first_reading_and_survive_a_reload() -> None:
    c = DecisionCounts()
    c.update({"src": (100, 10)})  # baseline: HAProxy counted these before this process
    assert c.decisions("src") == 0 and c.cookies_issued == 0
    c.update({"src": (130, 13), "cookie": (5, 0)})
    assert (c.decisions("src"), c.decisions("cookie"), c.cookies_issued) == (30, 5, 3)
    c.update({"src": (4, 1)})  # a reload: a new worker counts from zero
    assert (c.decisions("src"), c.decisions("cookie"), c.cookies_issued) == (34, 5, 4)
    c.update({"src": (6, 1), "cookie": (2, 0)})  # `cookie` came back after the reload
    assert (c.decisions("src"), c.decisions("cookie"), c.cookies_issued) == (36, 7, 4)
