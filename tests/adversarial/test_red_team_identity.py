"""Red team (issue 10): identity stamps and forwarded addresses, sent as a hostile client
would — bytes grpcio never sends, headers repeated, addresses in their other spellings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hashmesh.balancer import keys
from hashmesh.v1 import common_pb2, hash_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.integration.test_balancer_proxy import start_backends, start_balancer
from tests.red_team_h2 import unary
from tests.source_relay import SourceRelay

LIST = "/hashmesh.v1.TaskService/ListTasks"
HASH = "/hashmesh.v1.HashService/Hash"
HASH_REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()


@pytest.mark.parametrize("expires", ["\u00b2".encode(), "\u0661\u0662".encode(), b"9" * 5000])
def test_a_stamp_with_odd_digits_is_refused_as_malformed(
    dsn: str, procs: Processes, expires: bytes
) -> None:
    """'²' passes str.isdigit() but not int(); 5000 digits pass neither int()'s limit: before,
    each escaped as ValueError (UNKNOWN, a traceback in the replica's log)."""
    replica = procs.hashd(dsn)
    stamp = [
        (b"x-hashmesh-identity", b"bob"),
        (b"x-hashmesh-identity-sig", b"v1;operator;" + expires + b";00"),
    ]
    answer = unary(replica.address, LIST, b"", stamp)
    assert (answer[b"grpc-status"], answer.get(b"grpc-message")) == (
        b"16",
        b"malformed identity stamp",
    )
    with grpc.insecure_channel(replica.address) as channel:  # the replica still serves
        task_pb2_grpc.TaskServiceStub(channel).ListTasks(task_pb2.ListTasksRequest(), timeout=10)
    replica.terminate()
    assert "Traceback" not in replica.log()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A balancer trusting 127.0.0.0/8 (this test plays the proxies there), in front of a test
    replica that echoes the identity it was stamped with."""
    log_dir = tmp_path_factory.mktemp("proxied")
    backends = start_backends(log_dir, 1)
    balancer = start_balancer(
        log_dir, backends, env={"HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.0/8"}
    )
    try:
        yield balancer.addresses["balancer"]
    finally:
        balancer.terminate()
        backends[0].terminate()


def _identity(address: str, forwarded: str) -> str:
    with grpc.insecure_channel(address) as channel:
        _, call = channel.unary_unary(HASH).with_call(
            HASH_REQUEST, timeout=10, metadata=[("x-forwarded-for", forwarded)]
        )
    return str(dict(call.trailing_metadata())["x-seen-identity"])


@pytest.mark.parametrize(
    "forwarded",
    [
        # A proxy on a dual-stack socket writes IPv4 peers mapped (nginx: '::ffff:a.b.c.d'):
        # before, the mapped spelling of a trusted proxy was not trusted, so every client behind
        # it collapsed into it (one tenant, one rate limit)...
        "203.0.113.7, ::ffff:127.0.0.5",
        # ...and a client's mapped spelling was another identity than its plain one (overrides
        # and tenancy keyed on 'ip:203.0.113.7' missed it).
        "::ffff:203.0.113.7, 127.0.0.5",
    ],
)
def test_forwarded_for_behind_trusted_proxies_names_the_client(
    proxied: str, forwarded: str
) -> None:
    assert _identity(proxied, forwarded) == "ip:203.0.113.7"


def test_a_client_behind_trusted_proxies_still_cannot_pick_its_identity(proxied: str) -> None:
    # The attacker writes the left of the list; the proxies append to its right.
    assert _identity(proxied, "6.6.6.6, 203.0.113.7, ::ffff:127.0.0.5") == "ip:203.0.113.7"
    assert _identity(proxied, "6.6.6.6, not-an-address, 203.0.113.7") == "ip:203.0.113.7"
    # grpc-core keeps only the last x-forwarded-for line it receives: a proxy must append
    # to the one line (as Envoy and nginx do), not add a second one.
    with grpc.insecure_channel(proxied) as channel:
        _, call = channel.unary_unary(HASH).with_call(
            HASH_REQUEST,
            timeout=10,
            metadata=[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "203.0.113.7")],
        )
    assert dict(call.trailing_metadata())["x-seen-identity"] == "ip:203.0.113.7"


def test_guessing_credentials_is_rate_limited_like_any_call(tmp_path: Path) -> None:
    """Wrong admin tokens and unknown API keys: before, refused before the rate limit was
    consulted, so a guesser had the whole balancer's speed (every guess an UNAUTHENTICATED,
    never a RESOURCE_EXHAUSTED). A guess now costs a token of the guesser's address."""
    rate, burst, guesses = 1, 5, 40
    alice = keys.generate_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(keys.key_line("alice", alice) + "\n")
    backends = start_backends(tmp_path, 1)
    balancer = start_balancer(
        tmp_path,
        backends,
        "--rate-limit",
        f"{rate}/{burst}",
        "--api-keys-file",
        str(keys_file),
        env={"HASHMESH_ADMIN_TOKEN": "the-real-operator-token"},
    )
    try:
        with SourceRelay("127.0.0.2", balancer.addresses["balancer"]) as guesser:
            for guess in ("authorization", "x-api-key"):
                codes: list[grpc.StatusCode] = []
                started = time.monotonic()
                with grpc.insecure_channel(guesser.address) as channel:
                    hash_call = channel.unary_unary(HASH)
                    for i in range(guesses):
                        value = f"Bearer guess-{i}" if guess == "authorization" else f"hm_guess-{i}"
                        try:
                            hash_call(HASH_REQUEST, timeout=10, metadata=[(guess, value)])
                            codes.append(grpc.StatusCode.OK)
                        except grpc.RpcError as error:
                            codes.append(error.code())
                elapsed = time.monotonic() - started
                tried = codes.count(grpc.StatusCode.UNAUTHENTICATED)
                print(
                    f"\n{guess} guesses checked: {tried} of {guesses} in {elapsed:.2f}s (limit {rate}/s, burst {burst})"
                )
                assert grpc.StatusCode.OK not in codes
                # The client's interval contains the balancer's, so this bound only grows with load.
                assert tried <= burst + rate * elapsed + 1
                assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == guesses - tried
                time.sleep(burst / rate)  # the guesser's bucket refills before the next kind
        # Whoever holds a key is in its own bucket, whatever the guesser at the same address did.
        with (
            SourceRelay("127.0.0.2", balancer.addresses["balancer"]) as same_host,
            grpc.insecure_channel(same_host.address) as channel,
        ):
            for _ in range(burst):
                channel.unary_unary(HASH)(HASH_REQUEST, timeout=10, metadata=[("x-api-key", alice)])
    finally:
        balancer.terminate()
        backends[0].terminate()
