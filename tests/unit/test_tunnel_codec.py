"""The tunnel's wire format: what goes in comes out, and junk is refused cleanly."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hashmesh.core.tunnel import (
    CANCEL,
    MalformedFrame,
    Reply,
    batch_length,
    decode_calls,
    decode_replies,
    encode_call,
    encode_cancel,
    encode_reply,
)


def test_calls_and_replies_round_trip_with_text_and_binary_metadata() -> None:
    metadata = (
        ("x-client-id", "alice"),
        ("trace-bin", b"\x00\xff"),
        ("x-forwarded-for", "127.0.0.2"),
    )
    batch = (
        encode_call(7, "/hashmesh.v1.HashService/Hash", metadata, 1.5, b"\x01payload")
        + encode_cancel(6)
        + encode_call(8, "/m", (), None, b"")
    )
    first, cancel, last = decode_calls(batch)
    assert (first.call_id, first.method, first.metadata, first.timeout, first.payload) == (
        7,
        "/hashmesh.v1.HashService/Hash",
        metadata,
        1.5,
        b"\x01payload",
    )
    assert cancel.kind == CANCEL and cancel.call_id == 6
    assert last.timeout is None and last.payload == b"" and last.metadata == ()

    reply = Reply(
        7,
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad ✓",
        (("x-initial", "b1"),),
        (("grpc-status-details-bin", b"\x08\x03"),),
        b"",
    )
    (decoded,) = decode_replies(encode_reply(reply))
    assert (decoded.call_id, decoded.code, decoded.details, decoded.initial, decoded.trailing) == (
        7,
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad ✓",
        reply.initial,
        reply.trailing,
    )


def test_timeouts_no_timer_can_hold_mean_no_deadline() -> None:
    frames = b"".join(
        encode_call(i, "/m", (), t, b"") for i, t in enumerate((1e300, float("nan"), 0.0, -0.5))
    )
    # A deadline that passed on the way (negative time left) stays expired.
    assert [f.timeout for f in decode_calls(frames)] == [None, None, 0.0, 0.0]


def test_a_truncated_frame_is_refused() -> None:
    frame = encode_call(1, "/m", (("k", "v"),), None, b"abcdef")
    for cut in (3, len(frame) - 1):
        with pytest.raises(MalformedFrame):
            list(decode_calls(frame[:cut]))
    with pytest.raises(MalformedFrame):
        list(decode_replies(encode_reply(Reply(1, grpc.StatusCode.OK, "", (), (), b"xyz"))[:-1]))


@given(st.binary(max_size=300))
def test_junk_never_raises_anything_but_malformed_frame(junk: bytes) -> None:
    for decode in (decode_calls, decode_replies):
        with contextlib.suppress(MalformedFrame):
            list(decode(junk))  # type: ignore[operator]


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=30), st.integers(1, 120))
def test_a_batch_stays_under_its_limit_and_never_leaves_a_frame_behind(
    frames: list[bytes], limit: int
) -> None:
    sent: list[bytes] = []
    rest = list(frames)
    while rest:
        count = batch_length(rest, limit)
        batch = rest[:count]
        assert count >= 1
        # Over the limit only when one frame alone is larger than it.
        assert sum(map(len, batch)) <= limit or count == 1
        # As many as fit: the next frame would have passed the limit.
        if count < len(rest):
            assert sum(map(len, batch)) + len(rest[count]) > limit
        sent += batch
        del rest[:count]
    assert sent == frames
