"""The socket carrier's framing: messages come out whole however the bytes arrive, and a
length over the limit is refused before anything is buffered for it."""

from __future__ import annotations

import struct

import pytest

from hashmesh.core.tunnel import MalformedFrame
from hashmesh.core.tunnel_socket import TOKEN_BYTES, MessageReader, pack, parse_advert


def test_messages_come_out_whole_from_any_split() -> None:
    stream = pack(b"first") + pack(b"") + pack(b"x" * 300)
    for step in (1, 3, 7, len(stream)):
        reader = MessageReader(1024)
        seen: list[bytes] = []
        for start in range(0, len(stream), step):
            seen += reader.feed(stream[start : start + step])
        assert seen == [b"first", b"", b"x" * 300]


def test_a_length_over_the_limit_is_refused_at_once() -> None:
    with pytest.raises(MalformedFrame):
        MessageReader(1024).feed(struct.pack("<I", 1025))


def test_only_a_port_and_a_full_token_are_an_offer() -> None:
    token = "ab" * TOKEN_BYTES
    assert parse_advert(f"5000 {token}") == (5000, bytes.fromhex(token))
    for value in (f"0 {token}", f"70000 {token}", "5000 abcd", "five " + token, b"5000 x", ""):
        assert parse_advert(value) is None
