"""What HAProxy's admin socket answers: typed rows and failure recognition (sans-I/O).

Owns: parsing `show servers state`, `show stat` (sessions per server), `show map` and `show info`
into typed values, and deciding per command whether an answer means failure (HAProxy answers most
errors as plain text, e.g. `No such server.`). Columns are found by their header names, so the
columns 3.x adds or reorders do not matter. Must not: open sockets, decide what to change, or know
about members.

Measured on 2.6: a successful `enable server`, `enable health`, `set server ... state`, `shutdown
sessions server`, `add map` or `del map` answers nothing at all; `add server` answers
`New server registered.`, `del server` answers `Server deleted.`; every failure is some other text.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from spoa.haproxy.errors import MalformedAnswer, RuntimeAPIError

_F = TypeVar("_F", bound=enum.IntFlag)


class OpState(enum.IntEnum):
    """`srv_op_state`: what the checks say."""

    STOPPED = 0  # DOWN (or in maintenance)
    STARTING = 1  # UP, warming up (slowstart)
    RUNNING = 2  # UP
    STOPPING = 3  # UP but soft-stopping (e.g. http-check disable-on-404)


class AdminState(enum.IntFlag):
    """`srv_admin_state`: what an administrator (or we) forced."""

    FMAINT = 0x01  # forced into maintenance (`disable server`, fresh `add server`)
    IMAINT = 0x02  # inherited from a tracked server
    CMAINT = 0x04  # `disabled` in the configuration
    FDRAIN = 0x08  # forced into drain (`set server ... state drain`)
    IDRAIN = 0x10  # drain inherited from a tracked server
    RMAINT = 0x20  # address resolution failed
    HMAINT = 0x40  # FQDN set from the stats socket


MAINT_MASK = AdminState.FMAINT | AdminState.IMAINT | AdminState.CMAINT | AdminState.RMAINT
DRAIN_MASK = AdminState.FDRAIN | AdminState.IDRAIN
_MAINT_BITS = int(MAINT_MASK)  # plain ints: IntFlag's `&` is slow enough to matter at 1,000 servers
_DRAIN_BITS = int(DRAIN_MASK)


class CheckResult(enum.IntEnum):
    """`srv_check_result`: the last health check's outcome."""

    UNKNOWN = 0
    NEUTRAL = 1
    FAILED = 2
    PASSED = 3
    CONDPASS = 4


class CheckState(enum.IntFlag):
    """`srv_check_state`."""

    INPROGRESS = 0x01
    CONFIGURED = 0x02
    ENABLED = 0x04
    PAUSED = 0x08  # checks stopped because the server entered maintenance (`disable server`)
    AGENT = 0x10


@dataclass(frozen=True, slots=True)
class ServerState:
    """One row of `show servers state <backend>`."""

    backend: str
    name: str
    id: int
    addr: str  # `-` when the server has no address yet (template slots)
    port: int
    op_state: OpState
    admin: AdminState
    check_result: CheckResult
    check_health: int  # the rise/fall counter: UP once it reaches `rise`
    check_state: CheckState
    check_status: int = 0
    weight: int = 1
    since_change: int = 0  # seconds since the last operational change

    @property
    def in_maintenance(self) -> bool:
        return bool(int(self.admin) & _MAINT_BITS)

    @property
    def draining(self) -> bool:
        return bool(int(self.admin) & _DRAIN_BITS)

    @property
    def checks_enabled(self) -> bool:
        return bool(int(self.check_state) & 0x04)  # CheckState.ENABLED

    @property
    def checks_paused(self) -> bool:
        return bool(int(self.check_state) & 0x08)  # CheckState.PAUSED

    @property
    def is_up(self) -> bool:
        """Takes new traffic: not in maintenance, not draining, and the checks say UP."""
        return (not self.in_maintenance and not self.draining
                and self.op_state in (OpState.RUNNING, OpState.STARTING))

    def check_passed(self, rise: int) -> bool:
        """The checks found it healthy: last check passed and the counter reached `rise`."""
        return self.check_result == CheckResult.PASSED and self.check_health >= rise


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of `show map <file>`: `ref` deletes exactly this entry (`del map <file> #<ref>`)."""

    ref: str
    key: str
    value: str


# --------------------------------------------------------------------------- failure recognition

_TWO_WORD_VERBS = frozenset({"show", "add", "del", "enable", "disable", "set", "shutdown", "clear",
                             "get", "commit", "prepare", "abort", "new"})


def verb_of(command: str) -> str:
    """`add server be/x 1.2.3.4:80 check` → `add server` (for metrics and answer rules)."""
    words = command.split()
    if not words:
        return ""
    if words[0] in _TWO_WORD_VERBS and len(words) > 1:
        return f"{words[0]} {words[1]}"
    return words[0]


def _ok_silent(answer: str) -> bool:
    return answer.strip() == ""


def _ok_servers_state(answer: str) -> bool:
    first = answer.lstrip("\n").split("\n", 1)[0].strip()
    return first.isdigit()


def _ok_show(answer: str) -> bool:
    text = answer.lstrip("\n")
    # `show map <file>` lists `0x... key value` lines (or nothing); bare `show map` lists maps.
    return text == "" or text.startswith("0x") or text.startswith("# id")


_ANSWER_RULES: dict[str, Callable[[str], bool]] = {
    "add server": lambda a: a.startswith("New server registered"),
    "del server": lambda a: a.startswith("Server deleted"),
    "show servers": _ok_servers_state,
    "show stat": lambda a: a.lstrip("\n").startswith("# pxname"),
    "show map": _ok_show,
    "show info": lambda a: "\nPid:" in a or a.startswith("Pid:"),
    "prepare map": lambda a: a.lstrip("\n").startswith("New version created:"),
    "show table": lambda a: a.lstrip("\n").startswith("# table:"),
    "prompt": lambda a: True,
    "quit": lambda a: True,
}


def answer_failed(command: str, answer: str) -> bool:
    """True when `answer` means `command` failed. Commands not listed succeed only silently."""
    rule = _ANSWER_RULES.get(verb_of(command), _ok_silent)
    return not rule(answer)


def check_answer(command: str, answer: str) -> str:
    """Return `answer`, or raise RuntimeAPIError(command, answer) when it means failure."""
    if answer_failed(command, answer):
        raise RuntimeAPIError(command, answer)
    return answer


# --------------------------------------------------------------------------- parsers


def _int(value: str, column: str, command: str, answer: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise MalformedAnswer(command, answer, f"column {column} is not a number: {value!r}") from None


def _flags(table: Mapping[int, _F], cls: type[_F], value: int) -> _F:
    found = table.get(value)
    return found if found is not None else cls(value)


# Lookup tables built once (immutable after import): converting 1,000 rows stays cheap.
_OP_STATES = {v.value: v for v in OpState}
_CHECK_RESULTS = {v.value: v for v in CheckResult}
_ADMIN_STATES = {i: AdminState(i) for i in range(128)}
_CHECK_STATES = {i: CheckState(i) for i in range(32)}


_REQUIRED_STATE_COLUMNS = ("be_name", "srv_id", "srv_name", "srv_addr", "srv_op_state", "srv_admin_state",
                           "srv_check_result", "srv_check_health", "srv_check_state", "srv_port")


def parse_servers_state(answer: str, command: str = "show servers state") -> list[ServerState]:
    """Rows of `show servers state [<backend>]` (format version 1, columns found by name).

    An unknown `srv_op_state` reads as STOPPED and an unknown check result as UNKNOWN: a value we do
    not understand never makes a server look healthy.
    """
    lines = answer.split("\n")
    idx = 0
    while idx < len(lines) and not lines[idx].strip():
        idx += 1
    if idx >= len(lines) or not lines[idx].strip().isdigit():
        raise MalformedAnswer(command, answer, "no format version line")
    idx += 1
    columns: list[str] | None = None
    at: dict[str, int] = {}
    rows: list[ServerState] = []
    for line in lines[idx:]:
        if not line.strip():
            continue
        if line.startswith("#"):
            if columns is None:
                columns = line[1:].split()
                missing = [c for c in _REQUIRED_STATE_COLUMNS if c not in columns]
                if missing:
                    raise MalformedAnswer(command, answer, f"missing columns {', '.join(missing)}")
                at = {c: i for i, c in enumerate(columns)}
            continue
        if columns is None:
            raise MalformedAnswer(command, answer, "data before the column header")
        f = line.split()
        if len(f) != len(columns):
            raise MalformedAnswer(command, answer, f"{len(f)} fields for {len(columns)} columns")
        try:
            rows.append(ServerState(
                backend=f[at["be_name"]],
                name=f[at["srv_name"]],
                id=int(f[at["srv_id"]]),
                addr=f[at["srv_addr"]],
                port=int(f[at["srv_port"]]),
                op_state=_OP_STATES.get(int(f[at["srv_op_state"]]), OpState.STOPPED),
                admin=_flags(_ADMIN_STATES, AdminState, int(f[at["srv_admin_state"]])),
                check_result=_CHECK_RESULTS.get(int(f[at["srv_check_result"]]), CheckResult.UNKNOWN),
                check_health=int(f[at["srv_check_health"]]),
                check_state=_flags(_CHECK_STATES, CheckState, int(f[at["srv_check_state"]])),
                check_status=int(f[at["srv_check_status"]]) if "srv_check_status" in at else 0,
                weight=int(f[at["srv_uweight"]]) if "srv_uweight" in at else 1,
                since_change=int(f[at["srv_time_since_last_change"]]) if "srv_time_since_last_change" in at else 0,
            ))
        except ValueError:
            raise MalformedAnswer(command, answer, f"a number column is not a number: {line[:120]!r}") from None
    if columns is None:
        raise MalformedAnswer(command, answer, "no column header")
    return rows


def parse_server_sessions(answer: str, backend: str, command: str = "show stat") -> dict[str, int]:
    """Current sessions plus queued requests per server of `backend`, from `show stat` CSV."""
    lines = answer.lstrip("\n").split("\n")
    if not lines or not lines[0].startswith("# "):
        raise MalformedAnswer(command, answer, "no CSV header")
    columns = lines[0][2:].split(",")
    try:
        px, sv, scur = columns.index("pxname"), columns.index("svname"), columns.index("scur")
    except ValueError:
        raise MalformedAnswer(command, answer, "CSV header lacks pxname/svname/scur") from None
    qcur = columns.index("qcur") if "qcur" in columns else None
    sessions: dict[str, int] = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) <= max(px, sv, scur) or fields[px] != backend or fields[sv] in ("FRONTEND", "BACKEND"):
            continue
        count = _int(fields[scur] or "0", "scur", command, answer)
        if qcur is not None and qcur < len(fields):
            count += _int(fields[qcur] or "0", "qcur", command, answer)
        sessions[fields[sv]] = count
    return sessions


def parse_map(answer: str, command: str = "show map") -> list[MapEntry]:
    """Entries of `show map <file>`: `<ref> <key> <value...>` per line, in HAProxy's order."""
    entries: list[MapEntry] = []
    for line in answer.split("\n"):
        if not line.strip():
            continue
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].startswith("0x"):
            raise MalformedAnswer(command, answer, f"unexpected map line {line[:80]!r}")
        entries.append(MapEntry(parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
    return entries


def parse_info(answer: str, command: str = "show info") -> dict[str, str]:
    """`show info` as a dict (`Pid`, `Uptime_sec`, `Version`, ...)."""
    info: dict[str, str] = {}
    for line in answer.split("\n"):
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    if "Pid" not in info:
        raise MalformedAnswer(command, answer, "no Pid")
    return info


def prepared_version(answer: str, command: str = "prepare map") -> str:
    """The version number `prepare map` answered (`New version created: 7`)."""
    words = answer.split()
    if not words or not words[-1].isdigit():
        raise MalformedAnswer(command, answer, "no version number")
    return words[-1]


def info_pid(info: Mapping[str, str]) -> int | None:
    value = info.get("Pid", "")
    return int(value) if value.isdigit() else None


__all__ = [
    "DRAIN_MASK",
    "MAINT_MASK",
    "AdminState",
    "CheckResult",
    "CheckState",
    "MapEntry",
    "OpState",
    "ServerState",
    "answer_failed",
    "check_answer",
    "info_pid",
    "parse_info",
    "parse_map",
    "parse_server_sessions",
    "parse_servers_state",
    "prepared_version",
    "verb_of",
]
