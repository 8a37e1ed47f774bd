"""spoa.protocol.Connection: the per-connection state machine, fed bytes with time as a parameter.

Golden bytes were captured from Debian's HAProxy 2.6.12 talking to a recording listener (agent
backend `mode tcp` + `option spop-check`, message `route` with
`args key=req.cook(SWARMID) src=src id=req.hdr(X-Req-Id) path=path`).
"""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    FLAG_ABORT,
    FLAG_FIN,
    Connection,
    Disconnected,
    Event,
    FrameType,
    Hello,
    Message,
    Notify,
    ProtocolError,
    Scope,
    SetVar,
    State,
    Status,
    Value,
    decode_actions,
    decode_frame,
    decode_kv_list,
    encode_agent_hello,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_kv_list,
    encode_message,
    encode_notify,
    encode_set_var,
    split_frames,
)


def wire(body_hex: str) -> bytes:
    body = bytes.fromhex(body_hex)
    return struct.pack(">I", len(body)) + body


# HAProxy 2.6.12, engine HELLO: versions "2.0", max-frame-size 16380, "pipelining,async", engine-id.
GOLDEN_HELLO = wire(
    "0100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503"
    "fcf0060c6361706162696c69746965730810706970656c696e696e672c6173796e6309656e67696e652d6964082435"
    "333831363435622d666163392d343665322d613763652d336135653932366563663339")
# HAProxy 2.6.12, `option spop-check`: empty capabilities, healthcheck=true.
GOLDEN_HEALTHCHECK_HELLO = wire(
    "0100000001000012737570706f727465642d76657273696f6e730803322e300e6d61782d6672616d652d73697a6503"
    "fcf0060c6361706162696c697469657308000b6865616c7468636865636b11")
# HAProxy 2.6.12 NOTIFY: stream-id 0 (!), frame-id 1; cookie SWARMID=abc, src 127.0.0.1, X-Req-Id r1.
GOLDEN_NOTIFY = wire(
    "0300000001000105726f75746504036b6579080361626303737263067f00000102696408027231047061746808022f70")
# The next request on that HAProxy: no cookie, no header → NULL.
GOLDEN_NOTIFY_NULLS = wire(
    "0300000001020105726f75746504036b65790003737263067f00000102696400047061746808012f")
# What the agent answers to GOLDEN_HELLO: version 2.0, max-frame-size 16380, pipelining only.
GOLDEN_AGENT_HELLO = wire(
    "650000000100000776657273696f6e0803322e300e6d61782d6672616d652d73697a6503fcf0060c636170616269"
    "6c6974696573080a706970656c696e696e67")

ACTIONS = encode_set_var(Scope.TRANSACTION, "server", "s1")


def frames_of(data: bytes) -> list[tuple[int, int, int, int, dict[str, object] | bytes]]:
    bodies, rest = split_frames(data)
    assert rest == b""
    out: list[tuple[int, int, int, int, dict[str, object] | bytes]] = []
    for body in bodies:
        f = decode_frame(body)
        payload: dict[str, object] | bytes = (
            dict(decode_kv_list(f.payload)) if f.type in (101, 102) else f.payload)
        out.append((f.type, f.flags, f.stream_id, f.frame_id, payload))
    return out


def ready(**kwargs: object) -> Connection:
    conn = Connection(**kwargs)  # type: ignore[arg-type]
    events = conn.receive_data(GOLDEN_HELLO)
    assert [type(e) for e in events] == [Hello]
    assert conn.data_to_send()
    return conn


def hello_frame(items: dict[str, Value]) -> bytes:
    return encode_frame(FrameType.HAPROXY_HELLO, 0, 0, encode_kv_list(items))


def disconnect_of(conn: Connection) -> tuple[int, str]:
    assert conn.closed
    (ftype, flags, sid, fid, kv), = frames_of(conn.data_to_send())
    assert (ftype, flags, sid, fid) == (FrameType.AGENT_DISCONNECT, FLAG_FIN, 0, 0)
    assert isinstance(kv, dict)
    status, message = kv["status-code"], kv["message"]
    assert isinstance(status, int) and isinstance(message, bytes)
    return status, message.decode()


# --------------------------------------------------------------------------- golden bytes


def test_golden_hello_from_haproxy_26_is_accepted_with_the_golden_answer() -> None:
    conn = Connection()
    events = conn.receive_data(GOLDEN_HELLO)
    assert events == [Hello(max_frame_size=16380, pipelining=True, healthcheck=False,
                            engine_id="5381645b-fac9-46e2-a7ce-3a5e926ecf39")]
    assert conn.state is State.READY
    assert conn.data_to_send() == GOLDEN_AGENT_HELLO
    assert encode_agent_hello("2.0", 16380, "pipelining") == GOLDEN_AGENT_HELLO


def test_golden_notifies_from_haproxy_26_decode() -> None:
    conn = ready()
    events = conn.receive_data(GOLDEN_NOTIFY + GOLDEN_NOTIFY_NULLS)
    assert events == [
        Notify(0, 1, [Message("route", {"key": b"abc", "src": IPv4Address("127.0.0.1"),
                                        "id": b"r1", "path": b"/p"})]),
        Notify(2, 1, [Message("route", {"key": None, "src": IPv4Address("127.0.0.1"),
                                        "id": None, "path": b"/"})]),
    ]


def test_golden_healthcheck_hello_is_answered_then_closed_without_disconnect() -> None:
    conn = Connection()
    events = conn.receive_data(GOLDEN_HEALTHCHECK_HELLO)
    assert events == [Hello(16380, pipelining=False, healthcheck=True, engine_id=None)]
    assert conn.closed and conn.error is None
    (ftype, _, _, _, kv), = frames_of(conn.data_to_send())
    assert ftype == FrameType.AGENT_HELLO
    assert kv == {"version": b"2.0", "max-frame-size": 16380, "capabilities": b""}
    assert conn.receive_data(GOLDEN_NOTIFY) == []


# --------------------------------------------------------------------------- HELLO negotiation


@given(theirs=st.integers(256, (1 << 32) - 1), ours=st.integers(256, 1 << 20),
       caps=st.lists(st.sampled_from(["pipelining", "async", "fragmentation", "x"]), max_size=4))
def test_hello_negotiates_min_frame_size_and_only_offered_pipelining(theirs: int, ours: int,
                                                                    caps: list[str]) -> None:
    conn = Connection(max_frame_size=ours)
    (hello,) = conn.receive_data(encode_haproxy_hello("2.0", theirs, " , ".join(caps)))
    assert isinstance(hello, Hello)
    (ftype, _, _, _, kv), = frames_of(conn.data_to_send())
    assert ftype == FrameType.AGENT_HELLO
    assert isinstance(kv, dict)
    assert kv["version"] == b"2.0"
    assert kv["max-frame-size"] == min(theirs, ours) == conn.max_frame_size == hello.max_frame_size
    assert kv["capabilities"] == (b"pipelining" if "pipelining" in caps else b"")
    assert hello.pipelining == ("pipelining" in caps)


def test_max_frame_size_is_answered_as_uint32() -> None:
    conn = Connection()
    conn.receive_data(encode_haproxy_hello())
    assert b"\x0emax-frame-size\x03" in conn.data_to_send()  # 3 = UINT32


@pytest.mark.parametrize("versions", ["2.0", "1.0, 2.0", " 2.0 ,3.0", "2.5"])
def test_hello_accepts_any_list_holding_major_2(versions: str) -> None:
    conn = Connection()
    conn.receive_data(encode_haproxy_hello(versions))
    assert conn.state is State.READY


@pytest.mark.parametrize(("hello", "status"), [
    (encode_haproxy_hello("1.0"), Status.BAD_VERSION),
    (encode_haproxy_hello("3.0,garbage"), Status.BAD_VERSION),
    (encode_haproxy_hello(max_frame_size=255), Status.BAD_FRAME_SIZE),
    (hello_frame({"max-frame-size": 16380, "capabilities": ""}), Status.NO_VERSION),
    (hello_frame({"supported-versions": "2.0", "capabilities": ""}),
     Status.NO_FRAME_SIZE),
    (hello_frame({"supported-versions": "2.0", "max-frame-size": True, "capabilities": ""}),
     Status.NO_FRAME_SIZE),
    (hello_frame({"supported-versions": "2.0", "max-frame-size": 16380}),
     Status.NO_CAPABILITIES),
])
def test_bad_hello_is_answered_with_the_matching_status(hello: bytes, status: Status) -> None:
    conn = Connection()
    assert conn.receive_data(hello) == []
    assert conn.error is not None and conn.error.status == status
    got_status, message = disconnect_of(conn)
    assert got_status == status and message == conn.error.message != ""


def test_frame_before_hello_is_invalid() -> None:
    conn = Connection()
    conn.receive_data(GOLDEN_NOTIFY)
    assert disconnect_of(conn)[0] == Status.INVALID


def test_hello_twice_and_agent_frames_from_haproxy_are_invalid() -> None:
    conn = ready()
    conn.receive_data(GOLDEN_HELLO)
    assert disconnect_of(conn)[0] == Status.INVALID
    conn = ready()
    conn.receive_data(encode_frame(FrameType.ACK, 1, 1, ACTIONS))
    assert disconnect_of(conn)[0] == Status.INVALID


def test_unknown_frame_types_are_skipped() -> None:
    conn = ready()
    events = conn.receive_data(encode_frame(42, 0, 0, b"whatever") + GOLDEN_NOTIFY)
    assert [type(e) for e in events] == [Notify] and conn.state is State.READY


# --------------------------------------------------------------------------- DISCONNECT and close


def test_haproxy_disconnect_is_answered_and_earlier_notifies_still_returned() -> None:
    conn = ready()
    events = conn.receive_data(GOLDEN_NOTIFY + encode_haproxy_disconnect(2, "timeout") + GOLDEN_NOTIFY_NULLS)
    assert [type(e) for e in events] == [Notify, Disconnected]
    assert events[1] == Disconnected(2, "timeout")
    assert disconnect_of(conn) == (Status.NORMAL, "bye")
    assert conn.error is None


def test_haproxy_disconnect_before_hello_is_answered() -> None:
    conn = Connection()
    assert conn.receive_data(encode_haproxy_disconnect(0, "")) == [Disconnected(0, "")]
    assert disconnect_of(conn)[0] == Status.NORMAL


def test_close_sends_agent_disconnect_once_and_stops_reading() -> None:
    conn = ready()
    conn.close(Status.NORMAL, "agent shutting down")
    assert disconnect_of(conn) == (0, "agent shutting down")
    conn.close()
    assert conn.data_to_send() == b""
    assert conn.receive_data(GOLDEN_NOTIFY) == []


# --------------------------------------------------------------------------- bad frames


def test_notify_without_fin_is_refused_as_fragmentation() -> None:
    conn = ready()
    notify = encode_frame(FrameType.NOTIFY, 1, 1, encode_message("m", {}), flags=0)
    conn.receive_data(notify)
    assert disconnect_of(conn)[0] == Status.FRAGMENTATION_NOT_SUPPORTED


def test_unset_continuation_frame_is_refused_as_fragmentation() -> None:
    conn = ready()
    conn.receive_data(encode_frame(FrameType.UNSET, 1, 1, b""))
    assert disconnect_of(conn)[0] == Status.FRAGMENTATION_NOT_SUPPORTED


def test_abort_flag_on_an_unfragmented_notify_is_ignored() -> None:
    conn = ready()
    events = conn.receive_data(encode_frame(FrameType.NOTIFY, 1, 1, b"", flags=FLAG_FIN | FLAG_ABORT))
    assert events == [Notify(1, 1, [])]


def test_oversized_frame_is_refused_from_its_length_alone() -> None:
    conn = Connection(max_frame_size=1024)
    conn.receive_data(encode_haproxy_hello(max_frame_size=4096))
    conn.data_to_send()
    assert conn.max_frame_size == 1024
    conn.receive_data(struct.pack(">I", 1025))  # refused before the body arrives
    assert disconnect_of(conn)[0] == Status.TOO_BIG


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    conn = Connection(max_frame_size=300)
    conn.receive_data(encode_haproxy_hello(max_frame_size=4096))
    body_room = 300 - 7
    message = encode_message("m", {"k": b"x" * (body_room - 10)})
    payload = message + b"\x00" * 0
    frame = encode_notify(1, 1, payload)
    assert len(frame) - 4 <= 300
    frame = encode_notify(1, 1, encode_message("m", {"k": b"x" * (body_room - 10 + 300 - len(frame) + 4)}))
    assert len(frame) - 4 == 300
    assert [type(e) for e in conn.receive_data(frame)] == [Notify]


def test_truncated_frame_waits_then_times_out_with_time_as_a_parameter() -> None:
    conn = ready(now=100.0, read_timeout=5.0)
    assert conn.get_timer() is None
    conn.receive_data(GOLDEN_NOTIFY[:10], now=200.0)
    assert conn.buffered == 10 and conn.get_timer() == 205.0
    conn.handle_timer(204.9)
    assert not conn.closed
    conn.receive_data(GOLDEN_NOTIFY[10:20], now=203.0)  # more bytes do not reset the deadline
    assert conn.get_timer() == 205.0
    conn.handle_timer(205.0)
    assert disconnect_of(conn)[0] == Status.TIMEOUT


def test_each_partial_frame_gets_its_own_deadline_on_a_busy_stream() -> None:
    conn = ready(read_timeout=5.0)
    conn.receive_data(GOLDEN_NOTIFY[:10], now=0.0)
    assert conn.get_timer() == 5.0
    # every read completes a frame and ends inside the next one: progress, not a slow loris
    assert len(conn.receive_data(GOLDEN_NOTIFY[10:] + GOLDEN_NOTIFY[:10], now=4.0)) == 1
    assert conn.get_timer() == 9.0
    conn.handle_timer(6.0)
    assert not conn.closed


def test_a_pause_of_ours_restarts_the_deadline_of_a_partial_frame() -> None:
    conn = ready(read_timeout=5.0)
    conn.restart_read_deadline(3.0)  # nothing partial: nothing to restart
    assert conn.get_timer() is None
    conn.receive_data(GOLDEN_NOTIFY[:10], now=1.0)
    conn.restart_read_deadline(30.0)  # the agent stopped reading from 1 to 30 (back-pressure)
    assert conn.get_timer() == 35.0
    conn.handle_timer(34.9)
    assert not conn.closed and [type(e) for e in conn.receive_data(GOLDEN_NOTIFY[10:], now=34.9)] == [Notify]


def test_completing_the_frame_clears_the_deadline() -> None:
    conn = ready(read_timeout=5.0)
    conn.receive_data(GOLDEN_NOTIFY[:10], now=1.0)
    assert [type(e) for e in conn.receive_data(GOLDEN_NOTIFY[10:], now=2.0)] == [Notify]
    assert conn.get_timer() is None and conn.buffered == 0


def test_hello_deadline_runs_from_the_connection_start() -> None:
    conn = Connection(10.0, read_timeout=2.0)
    assert conn.get_timer() == 12.0
    conn.handle_timer(12.0)
    status, message = disconnect_of(conn)
    assert status == Status.TIMEOUT and "HAPROXY-HELLO" in message


def test_string_running_past_its_frame_is_invalid_even_if_more_bytes_follow() -> None:
    conn = ready()
    body = bytes.fromhex("03000000010101") + b"\x01m\x01\x01k\x08\x20abc"  # STRING of 32 in a short frame
    conn.receive_data(struct.pack(">I", len(body)) + body + GOLDEN_NOTIFY)
    assert disconnect_of(conn)[0] == Status.INVALID


def test_notifies_before_a_bad_frame_are_returned_to_be_answered() -> None:
    conn = ready()
    events = conn.receive_data(GOLDEN_NOTIFY + encode_frame(FrameType.NOTIFY, 1, 1, b"\x05", flags=1))
    assert [type(e) for e in events] == [Notify]
    assert disconnect_of(conn)[0] == Status.INVALID


def test_notifies_in_the_same_read_as_a_hello_are_dropped_if_the_read_then_fails() -> None:
    conn = Connection()
    events = conn.receive_data(GOLDEN_HELLO + GOLDEN_NOTIFY + b"\x00\x00\x00\x01\x03")
    assert [type(e) for e in events] == [Hello]
    types = [f[0] for f in frames_of(conn.data_to_send())]
    assert types == [FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT]


# --------------------------------------------------------------------------- ACK


def test_ack_for_every_notify_with_the_same_ids_in_any_order() -> None:
    conn = ready()
    sent = [(random.randrange(1 << 40), fid) for fid in range(20)]
    sent.append((0, 1))  # stream-id 0, as HAProxy 2.6 sends
    stream = b"".join(encode_notify(sid, fid, encode_message("route", {"id": f"{sid}".encode()}))
                      for sid, fid in sent)
    events = conn.receive_data(stream)
    assert len(events) == len(sent)
    random.shuffle(events)
    acks = b""
    for event in events:
        assert isinstance(event, Notify)
        acks += conn.ack(event.stream_id, event.frame_id,
                         encode_set_var(Scope.TRANSACTION, "server", event.messages[0].args["id"]))
    answered = {}
    for ftype, flags, sid, fid, payload in frames_of(acks):
        assert (ftype, flags) == (FrameType.ACK, FLAG_FIN)
        assert isinstance(payload, bytes)
        (action,) = decode_actions(payload)
        assert isinstance(action, SetVar)
        answered[(sid, fid)] = action.value
    assert answered == {(sid, fid): f"{sid}".encode() for sid, fid in sent}


def test_ack_refuses_empty_or_oversized_actions() -> None:
    conn = Connection(max_frame_size=256)
    conn.receive_data(encode_haproxy_hello())
    with pytest.raises(ValueError):
        conn.ack(1, 1, b"")
    big = encode_set_var(Scope.TRANSACTION, "v", "x" * 250)
    with pytest.raises(ValueError):
        conn.ack(1, 1, big)
    fits = encode_set_var(Scope.TRANSACTION, "v", "x" * 200)
    assert len(conn.ack(1 << 60, 1 << 60, fits)) - 4 <= 256


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.binary(min_size=1, max_size=300))
def test_ack_from_wire_ids_is_the_same_frame_as_ack(sid: int, fid: int, actions: bytes) -> None:
    """The per-request path echoes the NOTIFY's id bytes instead of encoding the ids again."""
    conn = Connection(max_frame_size=256)
    conn.receive_data(encode_haproxy_hello())
    (event,) = conn.receive_data(encode_notify(sid, fid, encode_message("route", {"k": b"v"})))
    assert isinstance(event, Notify) and (event.stream_id, event.frame_id) == (sid, fid)
    try:
        expected = conn.ack(sid, fid, actions)
    except ValueError:
        with pytest.raises(ValueError):
            conn.ack_ids(event.ids, actions)
        return
    assert conn.ack_ids(event.ids, actions) == expected
    with pytest.raises(ValueError):
        conn.ack_ids(event.ids, b"")


# --------------------------------------------------------------------------- streams, split and fuzzed

STREAM = GOLDEN_HELLO + GOLDEN_NOTIFY + GOLDEN_NOTIFY_NULLS + encode_haproxy_disconnect(0, "")


def feed(conn: Connection, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=20))
def test_any_split_of_the_stream_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    whole = feed(Connection(), [STREAM])
    assert [type(e) for e in whole] == [Hello, Notify, Notify, Disconnected]
    assert feed(Connection(), chunks) == whole


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes_never_raise_and_close_with_a_status(data: bytes, after_hello: bool) -> None:
    conn = ready() if after_hello else Connection()
    conn.receive_data(data)
    if conn.closed and conn.error is not None:
        assert disconnect_of(conn)[0] == conn.error.status


@settings(max_examples=300)
@given(st.data())
def test_mutated_streams_never_raise(data: st.DataObject) -> None:
    buf = bytearray(STREAM)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(i, data.draw(st.integers(0, 255)))
        else:
            del buf[i]
    conn = Connection()
    try:
        conn.receive_data(bytes(buf))
    except ProtocolError:  # pragma: no cover - must not happen: errors become AGENT-DISCONNECT
        pytest.fail("ProtocolError escaped receive_data")
    assert conn.closed or conn.state in (State.READY, State.AWAITING_HELLO)
