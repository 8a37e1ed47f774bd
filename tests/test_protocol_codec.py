"""spoa.protocol codec and frames: round trips for every datum and frame, and hostile bytes.

Property tests (Hypothesis) in the manner of h2: every encoder's output decodes to the same value,
and arbitrary or mutated bytes only ever raise ProtocolError.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.protocol import (
    FLAG_FIN,
    Binary,
    FrameType,
    Message,
    ProtocolError,
    Scope,
    SetVar,
    Status,
    UnsetVar,
    Value,
    decode_actions,
    decode_data,
    decode_frame,
    decode_kv_list,
    decode_messages,
    decode_varint,
    encode_ack,
    encode_agent_disconnect,
    encode_agent_hello,
    encode_binary,
    encode_bool,
    encode_data,
    encode_frame,
    encode_haproxy_disconnect,
    encode_haproxy_hello,
    encode_int32,
    encode_int64,
    encode_ipv4,
    encode_ipv6,
    encode_kv_list,
    encode_message,
    encode_notify,
    encode_null,
    encode_set_var,
    encode_string,
    encode_uint32,
    encode_uint64,
    encode_unset_var,
    encode_varint,
    split_frames,
)

U64 = (1 << 64) - 1

# --------------------------------------------------------------------------- varint


@pytest.mark.parametrize(("value", "wire"), [
    (0, "00"), (239, "ef"), (240, "f000"), (2287, "ff7f"), (2288, "f08000"),
    (16380, "fcf006"),  # HAProxy 2.6's max-frame-size, as captured
    (264431, "ffff7f"), (264432, "f0808000"), (U64, "fff0fefefefefefefe0e"),  # 10 bytes at most
])
def test_varint_boundaries_of_doc_spoe(value: int, wire: str) -> None:
    assert encode_varint(value).hex() == wire
    assert decode_varint(bytes.fromhex(wire), 0, len(wire) // 2) == (value, len(wire) // 2)


@given(st.integers(0, U64), st.binary(max_size=4))
def test_varint_round_trip(value: int, trailer: bytes) -> None:
    raw = encode_varint(value)
    assert len(raw) <= 10
    assert decode_varint(raw + trailer, 0, len(raw) + len(trailer)) == (value, len(raw))


def test_varint_refuses_out_of_range_and_overlong() -> None:
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError):
        encode_varint(U64 + 1)
    with pytest.raises(ProtocolError) as e:
        decode_varint(b"\xff" * 20, 0, 20)
    assert e.value.status == Status.INVALID
    with pytest.raises(ProtocolError):  # 10 bytes whose value exceeds 64 bits
        decode_varint(bytes.fromhex("ffffffffffffffffff7f"), 0, 10)
    with pytest.raises(ProtocolError):  # continuation bit set on the last byte before `end`
        decode_varint(b"\xf0\x80\x00", 0, 2)


# --------------------------------------------------------------------------- typed data

ip4 = st.integers(0, (1 << 32) - 1).map(IPv4Address)
ip6 = st.integers(0, (1 << 128) - 1).map(IPv6Address)

typed: st.SearchStrategy[tuple[bytes, Value]] = st.one_of(
    st.just((encode_null(), None)),
    st.booleans().map(lambda v: (encode_bool(v), v)),
    st.integers(-(1 << 31), (1 << 31) - 1).map(lambda v: (encode_int32(v), v)),
    st.integers(0, (1 << 32) - 1).map(lambda v: (encode_uint32(v), v)),
    st.integers(-(1 << 63), (1 << 63) - 1).map(lambda v: (encode_int64(v), v)),
    st.integers(0, U64).map(lambda v: (encode_uint64(v), v)),
    ip4.map(lambda v: (encode_ipv4(v), v)),
    ip6.map(lambda v: (encode_ipv6(v), v)),
    st.binary(max_size=600).map(lambda v: (encode_string(v), v)),
    st.text(max_size=100).map(lambda v: (encode_string(v), v.encode("utf-8", "surrogateescape"))),
    st.binary(max_size=600).map(lambda v: (encode_binary(v), Binary(v))),
)


@given(typed, st.binary(max_size=4))
def test_every_datum_round_trips(item: tuple[bytes, Value], trailer: bytes) -> None:
    raw, value = item
    decoded, pos = decode_data(raw + trailer, 0, len(raw) + len(trailer))
    assert pos == len(raw)
    assert decoded == value
    assert type(decoded) is type(value)


python_values: st.SearchStrategy[Value] = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), U64), st.binary(max_size=64),
    st.binary(max_size=64).map(Binary), ip4, ip6)


@given(python_values)
def test_encode_data_picks_a_type_that_decodes_to_the_same_value(value: Value) -> None:
    raw = encode_data(value)
    assert decode_data(raw, 0, len(raw)) == (value, len(raw))


def test_data_type_bytes_follow_doc_spoe() -> None:
    assert encode_bool(True) == b"\x11" and encode_bool(False) == b"\x01"
    assert encode_null() == b"\x00"
    assert encode_int64(-1) == b"\x04" + encode_varint(U64)  # two's complement, as HAProxy casts
    assert encode_ipv4(IPv4Address("127.0.0.1")).hex() == "067f000001"
    assert encode_string("ab") == b"\x08\x02ab"
    assert encode_binary(b"ab") == b"\x09\x02ab"
    assert encode_data("é") == b"\x08\x02\xc3\xa9"
    with pytest.raises(ValueError):
        encode_int32(1 << 31)
    with pytest.raises(ValueError):
        encode_uint32(-1)
    with pytest.raises(TypeError):
        encode_data(1.5)  # type: ignore[arg-type]


def test_decode_data_refuses_reserved_types_and_truncation() -> None:
    for tag in range(10, 16):
        with pytest.raises(ProtocolError):
            decode_data(bytes((tag, 0)), 0, 2)
    for raw in (b"", b"\x06\x7f\x00", b"\x07" + b"\x00" * 15, b"\x08\x05abc", b"\x02", b"\x09\xf0"):
        with pytest.raises(ProtocolError):
            decode_data(raw, 0, len(raw))
    # A length that fits the buffer but not the frame (`end`) is refused too.
    with pytest.raises(ProtocolError):
        decode_data(b"\x08\x03abcNEXT", 0, 4)


# --------------------------------------------------------------------------- lists

names = st.text(max_size=20)
decoded_values: st.SearchStrategy[Value] = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), U64), st.binary(max_size=40),
    st.binary(max_size=40).map(Binary), ip4, ip6)


@given(st.dictionaries(names, decoded_values, max_size=8))
def test_kv_list_round_trip(items: dict[str, Value]) -> None:
    assert decode_kv_list(encode_kv_list(items)) == items


@given(st.lists(st.tuples(names, st.dictionaries(names, decoded_values, max_size=6)), max_size=4))
def test_messages_round_trip(messages: list[tuple[str, dict[str, Value]]]) -> None:
    payload = b"".join(encode_message(name, args) for name, args in messages)
    assert decode_messages(payload) == [Message(name, args) for name, args in messages]


def test_message_argument_count_is_one_byte() -> None:
    args: dict[str, Value] = {f"a{i}": None for i in range(255)}
    assert decode_messages(encode_message("m", args)) == [Message("m", args)]
    with pytest.raises(ValueError):
        encode_message("m", {f"a{i}": None for i in range(256)})


def test_unnamed_arguments_share_the_empty_name_and_the_last_wins() -> None:
    payload = encode_message("m", [("", b"first"), ("", b"second")])
    assert decode_messages(payload) == [Message("m", {"": b"second"})]


scopes = st.sampled_from(list(Scope))
actions = st.one_of(st.builds(SetVar, scopes, names, decoded_values), st.builds(UnsetVar, scopes, names))


@given(st.lists(actions, max_size=6))
def test_actions_round_trip(items: list[SetVar | UnsetVar]) -> None:
    payload = b"".join(encode_set_var(a.scope, a.name, a.value) if isinstance(a, SetVar)
                       else encode_unset_var(a.scope, a.name) for a in items)
    assert decode_actions(payload) == items


def test_set_var_bytes_follow_doc_spoe() -> None:
    # SET-VAR(1) NB-ARGS(3) SCOPE(txn=2) NAME(raw buffer) VALUE(typed STRING)
    assert encode_set_var(Scope.TRANSACTION, "server", "s1") == b"\x01\x03\x02\x06server\x08\x02s1"
    assert encode_unset_var(Scope.REQUEST, "x") == b"\x02\x02\x03\x01x"


# --------------------------------------------------------------------------- frames

ids = st.integers(0, U64)


@given(st.integers(0, 255), st.integers(0, (1 << 32) - 1), ids, ids, st.binary(max_size=300))
def test_frame_envelope_round_trip(ftype: int, flags: int, sid: int, fid: int, payload: bytes) -> None:
    wire = encode_frame(ftype, sid, fid, payload, flags=flags)
    bodies, rest = split_frames(wire)
    assert rest == b"" and len(bodies) == 1
    frame = decode_frame(bodies[0])
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id, frame.payload) == (
        ftype, flags, sid, fid, payload)


def _body(wire: bytes) -> bytes:
    bodies, rest = split_frames(wire)
    assert rest == b"" and len(bodies) == 1
    return bodies[0]


@given(st.text(max_size=20), st.integers(256, (1 << 32) - 1), st.text(max_size=40),
       st.one_of(st.none(), st.booleans()), st.one_of(st.none(), st.text(max_size=40)))
def test_haproxy_hello_round_trip(versions: str, size: int, caps: str, healthcheck: bool | None,
                                  engine: str | None) -> None:
    frame = decode_frame(_body(encode_haproxy_hello(versions, size, caps, healthcheck, engine)))
    assert (frame.type, frame.fin, frame.stream_id, frame.frame_id) == (FrameType.HAPROXY_HELLO, True, 0, 0)
    expected: dict[str, Value] = {"supported-versions": versions.encode("utf-8", "surrogateescape"),
                                  "max-frame-size": size, "capabilities": caps.encode("utf-8", "surrogateescape")}
    if healthcheck is not None:
        expected["healthcheck"] = healthcheck
    if engine is not None:
        expected["engine-id"] = engine.encode("utf-8", "surrogateescape")
    assert decode_kv_list(frame.payload) == expected


@given(st.text(max_size=10), st.integers(256, (1 << 32) - 1), st.text(max_size=40))
def test_agent_hello_round_trip(version: str, size: int, caps: str) -> None:
    frame = decode_frame(_body(encode_agent_hello(version, size, caps)))
    assert frame.type == FrameType.AGENT_HELLO and frame.fin
    assert decode_kv_list(frame.payload) == {"version": version.encode("utf-8", "surrogateescape"),
                                             "max-frame-size": size,
                                             "capabilities": caps.encode("utf-8", "surrogateescape")}


@pytest.mark.parametrize(("encode", "ftype"), [(encode_agent_disconnect, FrameType.AGENT_DISCONNECT),
                                               (encode_haproxy_disconnect, FrameType.HAPROXY_DISCONNECT)])
@given(status=st.integers(0, (1 << 32) - 1), message=st.text(max_size=80))
def test_disconnect_round_trip(encode: Callable[[int, str], bytes], ftype: FrameType, status: int,
                               message: str) -> None:
    frame = decode_frame(_body(encode(status, message)))
    assert frame.type == ftype and frame.fin and frame.stream_id == 0 and frame.frame_id == 0
    assert decode_kv_list(frame.payload) == {"status-code": status,
                                             "message": message.encode("utf-8", "surrogateescape")}


@given(ids, ids, st.lists(st.tuples(names, st.dictionaries(names, decoded_values, max_size=5)), max_size=3))
def test_notify_round_trip(sid: int, fid: int, messages: list[tuple[str, dict[str, Value]]]) -> None:
    frame = decode_frame(_body(encode_notify(sid, fid, b"".join(encode_message(n, a) for n, a in messages))))
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.NOTIFY, FLAG_FIN, sid, fid)
    assert decode_messages(frame.payload) == [Message(n, a) for n, a in messages]


@given(ids, ids, st.lists(actions, min_size=1, max_size=5))
def test_ack_round_trip(sid: int, fid: int, items: list[SetVar | UnsetVar]) -> None:
    payload = b"".join(encode_set_var(a.scope, a.name, a.value) if isinstance(a, SetVar)
                       else encode_unset_var(a.scope, a.name) for a in items)
    frame = decode_frame(_body(encode_ack(sid, fid, payload)))
    assert (frame.type, frame.flags, frame.stream_id, frame.frame_id) == (FrameType.ACK, FLAG_FIN, sid, fid)
    assert decode_actions(frame.payload) == items


def test_split_frames_refuses_a_length_above_the_limit_and_keeps_the_rest() -> None:
    with pytest.raises(ProtocolError) as e:
        split_frames(b"\x00\x00\x10\x00", max_frame_size=4095)
    assert e.value.status == Status.TOO_BIG
    wire = encode_ack(1, 2, b"\x02\x02\x02\x01x")
    assert split_frames(wire + wire[:5]) == ([wire[4:]], wire[:5])


# --------------------------------------------------------------------------- hostile bytes

PARSERS: list[Callable[[bytes], object]] = [
    decode_frame,
    decode_kv_list,
    decode_messages,
    decode_actions,
    lambda b: decode_data(b, 0, len(b)),
    lambda b: decode_varint(b, 0, len(b)),
    split_frames,
]


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    for parse in PARSERS:
        try:
            parse(data)
        except ProtocolError as e:
            assert isinstance(e.status, Status) and e.message


VALID_PAYLOADS = [
    encode_message("route", {"key": b"abc", "src": IPv4Address("10.0.0.1"), "none": None,
                             "n": 7, "big": U64, "b": True, "v6": IPv6Address("::1"), "bin": Binary(b"\0")}),
    encode_kv_list([("supported-versions", "2.0"), ("max-frame-size", 16380), ("capabilities", "pipelining")]),
    encode_set_var(Scope.TRANSACTION, "server", "s1") + encode_unset_var(Scope.SESSION, "x"),
]


@settings(max_examples=400)
@given(st.sampled_from(VALID_PAYLOADS), st.data())
def test_mutated_payloads_raise_only_protocol_error(payload: bytes, data: st.DataObject) -> None:
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf.insert(data.draw(st.integers(0, len(buf))), data.draw(st.integers(0, 255)))
        elif op == "delete" and buf:
            del buf[data.draw(st.integers(0, len(buf) - 1))]
        elif op == "truncate":
            del buf[data.draw(st.integers(0, len(buf))):]
    mutated = bytes(buf)
    for parse in PARSERS:
        with contextlib.suppress(ProtocolError):
            parse(mutated)


def test_ack_refuses_negative_ids() -> None:
    with pytest.raises(ValueError):
        encode_ack(-1, 1, b"\x02\x02\x02\x01x")
    with pytest.raises(ValueError):
        encode_ack(1, -1, b"\x02\x02\x02\x01x")
