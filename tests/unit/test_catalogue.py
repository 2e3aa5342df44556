"""The error catalogue, its generated texts, the reflection index and the rate-limit fields:
no sockets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hashmesh.balancer.config import DEFAULT_IDEMPOTENT
from hashmesh.balancer.ratelimit_fields import near_exhaustion, policy_field, remaining_field
from hashmesh.core import catalogue
from hashmesh.core.errors import (
    MAX_VIOLATIONS,
    DeadlineExceeded,
    HashmeshError,
    InvalidArgument,
    ResourceExhausted,
    Violations,
    retry_trailers,
    to_grpc_status,
)
from hashmesh.core.hashing.algorithms import Argon2Params
from hashmesh.core.reflection import DescriptorIndex, contract_files, default_index

ROOT = Path(__file__).resolve().parents[2]


def contract_methods() -> set[str]:
    return {
        f"{service.name}.{method.name}"
        for file in contract_files()
        if file.package == "hashmesh.v1"
        for service in file.service
        for method in service.method
    }


def test_generated_texts_match_the_catalogue() -> None:
    # protos/generate.py writes these; an edit of the catalogue without regenerating fails here.
    assert (ROOT / "docs" / "errors.md").read_text() == catalogue.markdown()
    for proto in sorted((ROOT / "protos" / "hashmesh" / "v1").glob("*.proto")):
        text = proto.read_text()
        assert catalogue.with_error_blocks(text) == text, proto.name
        if "\nservice " in text:
            assert catalogue.BLOCK_START in text, proto.name


def test_catalogue_covers_every_method_of_the_contract() -> None:
    methods = contract_methods()
    assert set(catalogue.EVERY) == methods
    assert set(catalogue.SAFE_TO_RETRY) == methods
    for entry in catalogue.CATALOGUE:
        assert set(entry.methods) <= methods, entry.name
    assert len({e.name for e in catalogue.CATALOGUE}) == len(catalogue.CATALOGUE)
    # What the balancer retries by itself is a subset of what is safe to retry.
    for path in DEFAULT_IDEMPOTENT:
        service, method = path.strip("/").split("/")
        assert catalogue.SAFE_TO_RETRY[f"{service.split('.')[-1]}.{method}"].startswith("yes")


def test_a_batch_reports_every_bad_field_within_a_bounded_answer() -> None:
    violations = Violations()
    for index in range(10_000):
        with violations.check():
            raise InvalidArgument(f"specs[{index}].priority", "x" * 5_000)
    with pytest.raises(InvalidArgument) as caught:
        violations.raise_if_any()
    error = caught.value
    assert len(error.violations) == MAX_VIOLATIONS and error.info["violations"] == "10000"
    status = to_grpc_status(error)
    assert sum(len(v) for _, v in status.trailing_metadata) < 8 * 1024


def test_argon2_bounds_report_every_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        Argon2Params.build(time_cost=-1, parallelism=99, hash_len=1, salt=b"s")
    assert [f for f, _ in caught.value.violations] == [
        "argon2.time_cost",
        "argon2.parallelism",
        "argon2.hash_len",
        "argon2.salt",
    ]


def test_retry_trailers_round_up_to_whole_units() -> None:
    assert retry_trailers(0.1) == (("retry-after", "1"), ("grpc-retry-pushback-ms", "100"))
    assert retry_trailers(2.0001) == (("retry-after", "3"), ("grpc-retry-pushback-ms", "2001"))
    status = to_grpc_status(ResourceExhausted("full", retry_after=1.5, reason="QUEUE_FULL"))
    assert dict(status.trailing_metadata)["retry-after"] == "2"


def test_ratelimit_fields_follow_the_ietf_syntax() -> None:
    assert policy_field("default", 20, 2.0) == ("ratelimit-policy", '"default";q=20;w=2')
    assert policy_field("client", 1, 0.001) == ("ratelimit-policy", '"client";q=1;w=1')
    assert remaining_field("default", 3, 0.25) == ("ratelimit", '"default";r=3;t=1')
    assert remaining_field("default", -2, 0.0) == ("ratelimit", '"default";r=0;t=0')
    # Near exhaustion from half the burst down.
    assert [near_exhaustion(left, 5) for left in (4, 3, 2, 0)] == [False, False, True, True]
    assert near_exhaustion(0, 1) and not near_exhaustion(1, 1)


def test_reflection_index_finds_methods_fields_and_dependencies() -> None:
    index = default_index()
    for symbol in (
        "hashmesh.v1.TaskService.WatchTask",
        "hashmesh.v1.TaskService",
        "hashmesh.v1.Argon2Params.time_cost",
        "hashmesh.v1.ALGORITHM_MD5",
        "hashmesh.v1.HashStreamRequest.kind",
        "grpc.health.v1.Health.List",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ):
        assert index.file_of(symbol) is not None, symbol
    files = index.with_dependencies("hashmesh/v1/task.proto")
    assert files is not None and len(files) == 4  # task, duration, timestamp, common
    assert index.with_dependencies("nope.proto") is None
    assert DescriptorIndex([]).file_of("hashmesh.v1.Task") is None


def test_every_reason_raised_in_the_code_is_catalogued() -> None:
    sources = [
        p
        for folder in ("core", "hashd", "balancer", "workerd")
        for p in (ROOT / folder).rglob("*.py")
    ]
    raised = {
        match for path in sources for match in re.findall(r'reason="([A-Z_]+)"', path.read_text())
    }
    assert raised, "no reason found: the pattern no longer matches the code"
    names = {e.name for e in catalogue.CATALOGUE}
    assert raised <= names, f"raised but not in core/catalogue.py: {sorted(raised - names)}"
    # Defaults of the error classes that reach clients without an explicit reason.
    for kind in (InvalidArgument, ResourceExhausted, DeadlineExceeded, HashmeshError):
        assert kind.default_reason in names, kind
