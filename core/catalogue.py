"""The error catalogue: every status the mesh answers, per method, as data.

Each entry is one ``google.rpc.ErrorInfo`` reason (domain ``hashmesh.dev``): its status code,
who answers it (the balancer or a replica), when, the details that come with it, and whether
a retry can help. ``protos/generate.py`` writes ``docs/errors.md`` and the "Errors" block of
each service's comment from it, and ``tests/e2e/test_error_catalogue.py`` provokes every entry
against a real mesh, so the three never drift apart. Pure data and text: no grpc import."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from enum import Enum

DOMAIN = "hashmesh.dev"


class Retry(Enum):
    """Whether sending the same call again can succeed."""

    NEVER = "no: the same request fails the same way; change it first"
    AFTER_DELAY = (
        "yes, after google.rpc.RetryInfo.retry_delay (also `retry-after` seconds and "
        "`grpc-retry-pushback-ms`)"
    )
    NOT_SENT = (
        "yes, after RetryInfo.retry_delay, for every method: the call never reached a replica"
    )
    IF_SAFE = "yes, with backoff, if the method is safe to retry (see the table below)"
    LONGER_DEADLINE = "yes, with a longer deadline, if the method is safe to retry"
    CREDENTIALS = "no: send valid credentials"


HASH = (
    "HashService.ComputeHash",
    "HashService.Hash",
    "HashService.HashStream",
    "HashService.Verify",
)
TASK = (
    "TaskService.SubmitTask",
    "TaskService.SubmitTasks",
    "TaskService.GetTask",
    "TaskService.WatchTask",
    "TaskService.SubmitAndWatchTask",
    "TaskService.ListTasks",
    "TaskService.CancelTask",
    "TaskService.RequeueTask",
    "TaskService.GetQueueStats",
)
CACHE = ("CacheService.GetCacheStats", "CacheService.ClearCache")
ADMIN = (
    "AdminService.GetStats",
    "AdminService.ListBackends",
    "AdminService.GetStrategy",
    "AdminService.SetStrategy",
    "AdminService.GetRateLimits",
    "AdminService.SetRateLimits",
    "AdminService.DrainBackend",
)
PROXIED = HASH + TASK + CACHE
"""Methods the balancer forwards to a replica (and limits, and authenticates)."""
EVERY = PROXIED + ADMIN
TASK_BY_ID = (
    "TaskService.GetTask",
    "TaskService.WatchTask",
    "TaskService.CancelTask",
    "TaskService.RequeueTask",
)
WITH_FIELDS = (
    *PROXIED,  # each has fields, or the `x-client-id` of a trusted proxy
    "AdminService.GetStats",
    "AdminService.SetStrategy",
    "AdminService.SetRateLimits",
    "AdminService.DrainBackend",
)

SAFE_TO_RETRY: dict[str, str] = {
    "HashService.ComputeHash": "yes",
    "HashService.Hash": "yes",
    "HashService.HashStream": "yes, if the client can send the whole stream again",
    "HashService.Verify": "yes",
    "TaskService.SubmitTask": "only with `spec.idempotency_key` set (else a task may be queued twice)",
    "TaskService.SubmitTasks": "only with an `idempotency_key` on every spec",
    "TaskService.GetTask": "yes",
    "TaskService.WatchTask": "yes (the new stream starts with the current state)",
    "TaskService.SubmitAndWatchTask": "only with `spec.idempotency_key` set (the same task is "
    "streamed again); once its first message arrived, WatchTask the task instead",
    "TaskService.ListTasks": "yes",
    "TaskService.CancelTask": "yes (a second cancel of a cancelled task is FAILED_PRECONDITION)",
    "TaskService.RequeueTask": "yes (a second requeue of a pending task is FAILED_PRECONDITION)",
    "TaskService.GetQueueStats": "yes",
    "CacheService.GetCacheStats": "yes",
    "CacheService.ClearCache": "yes",
    "AdminService.GetStats": "yes",
    "AdminService.ListBackends": "yes",
    "AdminService.GetStrategy": "yes",
    "AdminService.SetStrategy": "yes (setting the same strategy twice is harmless)",
    "AdminService.GetRateLimits": "yes",
    "AdminService.SetRateLimits": "yes (the same change twice is harmless)",
    "AdminService.DrainBackend": "yes",
}
"""Whether a method may be sent again after UNAVAILABLE or DEADLINE_EXCEEDED, when the first
attempt may or may not have taken effect."""


@dataclass(frozen=True)
class Entry:
    """One answer the mesh can give."""

    name: str
    """The ErrorInfo reason; for answers gRPC itself gives (without ErrorInfo), a label."""
    code: str
    """The gRPC status code name."""
    origin: str
    """Who answers: "balancer", "replica", "balancer or replica", or "gRPC" (no ErrorInfo)."""
    when: str
    """What provokes it."""
    details: tuple[str, ...]
    """The google.rpc detail messages in grpc-status-details-bin, in order."""
    retry: Retry
    methods: tuple[str, ...]
    """``Service.Method`` names that can answer it."""

    @property
    def has_error_info(self) -> bool:
        return "ErrorInfo" in self.details


CATALOGUE: tuple[Entry, ...] = (
    Entry(
        "INVALID_FIELD",
        "INVALID_ARGUMENT",
        "balancer or replica",
        "A field is missing, outside the bounds its comment states, or does not apply (argon2 "
        "parameters with another algorithm). BadRequest lists every bad field, of every spec of "
        "a batch, by path (`specs[3].argon2.time_cost`); at most 20 are listed and "
        'ErrorInfo.metadata["violations"] has the total when there are several. Also an '
        "`x-client-id` from a trusted proxy that is not a valid identity.",
        ("ErrorInfo", "BadRequest"),
        Retry.NEVER,
        WITH_FIELDS,
    ),
    Entry(
        "INPUT_TOO_LARGE",
        "INVALID_ARGUMENT",
        "replica",
        "An input is over the unary limit (HASHMESH_MAX_MESSAGE_BYTES, 4 MiB by default): "
        "`data`, a HashStream `chunk`, `spec.data` or `specs[i].data`. BadRequest names the "
        "field; ErrorInfo.metadata has `limit_bytes`, `size_bytes` and `use` (HashStream).",
        ("ErrorInfo", "BadRequest"),
        Retry.NEVER,
        (
            "HashService.ComputeHash",
            "HashService.Hash",
            "HashService.HashStream",
            "HashService.Verify",
            "TaskService.SubmitTask",
            "TaskService.SubmitTasks",
            "TaskService.SubmitAndWatchTask",
        ),
    ),
    Entry(
        "MALFORMED_REQUEST",
        "INVALID_ARGUMENT",
        "replica",
        "The request bytes do not parse as the method's request message.",
        ("ErrorInfo", "BadRequest"),
        Retry.NEVER,
        PROXIED,
    ),
    Entry(
        "MESSAGE_TOO_LARGE",
        "RESOURCE_EXHAUSTED",
        "gRPC",
        "A message over twice the unary limit: gRPC refuses it before any hashmesh code runs "
        '("Received message larger than max"), with no details.',
        (),
        Retry.NEVER,
        PROXIED,
    ),
    Entry(
        "TASK_NOT_FOUND",
        "NOT_FOUND",
        "replica",
        "No task has this id. ResourceInfo: resource_type `hashmesh.v1.Task`, resource_name "
        "the id.",
        ("ErrorInfo", "ResourceInfo"),
        Retry.NEVER,
        TASK_BY_ID,
    ),
    Entry(
        "BACKEND_NOT_FOUND",
        "NOT_FOUND",
        "balancer",
        "No replica has this address. ResourceInfo: resource_type `hashmesh.v1.Backend`.",
        ("ErrorInfo", "ResourceInfo"),
        Retry.NEVER,
        ("AdminService.DrainBackend",),
    ),
    Entry(
        "IDEMPOTENCY_KEY_REUSED",
        "ALREADY_EXISTS",
        "replica",
        "The idempotency key was used by this caller for a different request within "
        "HASHMESH_IDEMPOTENCY_WINDOW_SECONDS. ErrorInfo.metadata has `idempotency_key` and "
        "`task_id`; ResourceInfo names the first task.",
        ("ErrorInfo", "ResourceInfo"),
        Retry.NEVER,
        ("TaskService.SubmitTask", "TaskService.SubmitTasks", "TaskService.SubmitAndWatchTask"),
    ),
    Entry(
        "TASK_FINISHED",
        "FAILED_PRECONDITION",
        "replica",
        "The task is already in a final state (SUCCEEDED, CANCELLED, DEAD_LETTER). "
        "PreconditionFailure: type `TASK_STATUS`, subject `tasks/<id>`.",
        ("ErrorInfo", "PreconditionFailure"),
        Retry.NEVER,
        ("TaskService.CancelTask",),
    ),
    Entry(
        "TASK_NOT_REQUEUEABLE",
        "FAILED_PRECONDITION",
        "replica",
        "The task is neither DEAD_LETTER nor CANCELLED. PreconditionFailure: type "
        "`TASK_STATUS`, subject `tasks/<id>`.",
        ("ErrorInfo", "PreconditionFailure"),
        Retry.NEVER,
        ("TaskService.RequeueTask",),
    ),
    Entry(
        "TASK_INPUT_ERASED",
        "FAILED_PRECONDITION",
        "replica",
        "An argon2id task ended and its input (a password) was erased: submit it again. "
        "PreconditionFailure: type `TASK_STATUS`, subject `tasks/<id>`.",
        ("ErrorInfo", "PreconditionFailure"),
        Retry.NEVER,
        ("TaskService.RequeueTask",),
    ),
    Entry(
        "ARGON2_TASKS_DISABLED",
        "FAILED_PRECONDITION",
        "replica",
        "An argon2id task sent to a replica with no task input key (HASHMESH_TASK_KEY_FILE): "
        "its password would be stored in clear. PreconditionFailure: type `SETTING`, subject "
        "`hashd/HASHMESH_TASK_KEY_FILE`. ComputeHash still hashes argon2id at once.",
        ("ErrorInfo", "PreconditionFailure"),
        Retry.NEVER,
        ("TaskService.SubmitTask", "TaskService.SubmitTasks", "TaskService.SubmitAndWatchTask"),
    ),
    Entry(
        "RATE_LIMITED",
        "RESOURCE_EXHAUSTED",
        "balancer",
        "The caller's rate limit is used up. The headers and the trailers carry `ratelimit-policy` "
        "and `ratelimit` with `r=0`.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        PROXIED,
    ),
    Entry(
        "PEER_BUDGET_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "balancer",
        "This client (its API key, else its address) holds its share of one of the balancer's "
        "budgets already: calls in flight (HASHMESH_BALANCER_PEER_CALLS), upload, watch or "
        "other streams (HASHMESH_BALANCER_PEER_UPLOAD_STREAMS, ..._WATCH_STREAMS, "
        "..._OTHER_STREAMS), request bytes in flight (HASHMESH_BALANCER_PEER_BYTES), or calls "
        "from its address still waiting for their request message. The message names the "
        "setting; other clients are not refused.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        PROXIED,
    ),
    Entry(
        "BALANCER_BUDGET_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "balancer",
        "The balancer as a whole holds its limit of calls, streams of that kind or request "
        "bytes in flight (HASHMESH_BALANCER_TOTAL_CALLS, ..._TOTAL_UPLOAD_STREAMS, "
        "..._TOTAL_WATCH_STREAMS, ..._TOTAL_OTHER_STREAMS, ..._TOTAL_BYTES). The message names "
        "the setting.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        PROXIED,
    ),
    Entry(
        "OVERLOADED",
        "RESOURCE_EXHAUSTED",
        "replica",
        "The replica's argon2id executor (CPU threads and their queue) is full.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        ("HashService.ComputeHash", "HashService.Hash", "HashService.Verify"),
    ),
    Entry(
        "QUEUE_FULL",
        "RESOURCE_EXHAUSTED",
        "replica",
        "The queue holds HASHMESH_MAX_PENDING_TASKS unfinished tasks.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        ("TaskService.SubmitTask", "TaskService.SubmitTasks", "TaskService.SubmitAndWatchTask"),
    ),
    Entry(
        "CLIENT_QUEUE_FULL",
        "RESOURCE_EXHAUSTED",
        "replica",
        "This client has HASHMESH_MAX_PENDING_PER_CLIENT unfinished tasks.",
        ("ErrorInfo", "RetryInfo"),
        Retry.AFTER_DELAY,
        ("TaskService.SubmitTask", "TaskService.SubmitTasks", "TaskService.SubmitAndWatchTask"),
    ),
    Entry(
        "NO_REPLICA",
        "UNAVAILABLE",
        "balancer",
        "No replica can take the call (none configured, all drained or removed).",
        ("ErrorInfo", "RetryInfo"),
        Retry.NOT_SENT,
        PROXIED,
    ),
    Entry(
        "REPLICAS_BUSY",
        "UNAVAILABLE",
        "balancer",
        "Every replica is at its in-flight cap (HASHMESH_BALANCER_MAX_IN_FLIGHT for unary calls, HASHMESH_BALANCER_MAX_STREAMS_PER_BACKEND for streams).",
        ("ErrorInfo", "RetryInfo"),
        Retry.NOT_SENT,
        PROXIED,
    ),
    Entry(
        "DATABASE_UNAVAILABLE",
        "UNAVAILABLE",
        "replica",
        "PostgreSQL cannot be reached (or no pooled connection is free) after the replica's "
        "own retries.",
        ("ErrorInfo", "RetryInfo"),
        Retry.IF_SAFE,
        (*TASK, *CACHE),
    ),
    Entry(
        "API_KEY_MISSING",
        "UNAUTHENTICATED",
        "balancer",
        "API keys are on (HASHMESH_BALANCER_API_KEYS_FILE) and the call has no `x-api-key`.",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        PROXIED,
    ),
    Entry(
        "API_KEY_INVALID",
        "UNAUTHENTICATED",
        "balancer",
        "The `x-api-key` is not one the balancer knows.",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        PROXIED,
    ),
    Entry(
        "ADMIN_TOKEN_MISSING",
        "UNAUTHENTICATED",
        "balancer",
        "HASHMESH_ADMIN_TOKEN is set and the call has no `authorization: Bearer <token>`.",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        ADMIN,
    ),
    Entry(
        "ADMIN_TOKEN_INVALID",
        "UNAUTHENTICATED",
        "balancer or replica",
        "A bearer token that is not the admin token, on AdminService or on any call (where a "
        "valid one makes the caller an operator).",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        EVERY,
    ),
    Entry(
        "IDENTITY_STAMP_INVALID",
        "UNAUTHENTICATED",
        "replica",
        "A replica was called with an identity stamp (`x-hashmesh-identity`) that does not "
        "verify: forged, expired, for another method, or the replica has no "
        "HASHMESH_IDENTITY_SECRET. Only the balancer stamps calls; clients never send one.",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        (*TASK, *CACHE),
    ),
    Entry(
        "CLIENT_ID_NOT_CALLER",
        "PERMISSION_DENIED",
        "replica",
        "A request's `client_id` names someone other than the caller (only an operator lists "
        "other clients' tasks). Leave it empty.",
        ("ErrorInfo",),
        Retry.NEVER,
        (
            "TaskService.SubmitTask",
            "TaskService.SubmitTasks",
            "TaskService.SubmitAndWatchTask",
            "TaskService.ListTasks",
        ),
    ),
    Entry(
        "OPERATOR_ONLY",
        "PERMISSION_DENIED",
        "replica",
        "An operator call without the admin token (`authorization: Bearer "
        "<HASHMESH_ADMIN_TOKEN>`).",
        ("ErrorInfo",),
        Retry.CREDENTIALS,
        ("CacheService.ClearCache",),
    ),
    Entry(
        "ADMIN_LISTENER_ONLY",
        "PERMISSION_DENIED",
        "balancer",
        "AdminService called on the public listener while no admin token is set: it is served "
        "only on the admin listener (loopback by default).",
        ("ErrorInfo",),
        Retry.NEVER,
        ADMIN,
    ),
    Entry(
        "DEADLINE_PASSED",
        "DEADLINE_EXCEEDED",
        "replica",
        "The call's deadline passed before its work started (or while argon2id work waited "
        "for a thread). In practice the client's own deadline fires first, and the status "
        "comes from the client library, without details.",
        ("ErrorInfo",),
        Retry.LONGER_DEADLINE,
        PROXIED,
    ),
    Entry(
        "UNIMPLEMENTED",
        "UNIMPLEMENTED",
        "gRPC",
        "The method does not exist (a typo, or a client newer than the mesh).",
        (),
        Retry.NEVER,
        (),
    ),
    Entry(
        "INTERNAL",
        "INTERNAL",
        "balancer or replica",
        "A bug: the server logged the traceback. The message names the method only.",
        ("ErrorInfo",),
        Retry.IF_SAFE,
        EVERY,
    ),
)

BY_NAME = {entry.name: entry for entry in CATALOGUE}


def entries_for(method: str) -> list[Entry]:
    return [e for e in CATALOGUE if method in e.methods]


# -- rendering ------------------------------------------------------------------------------

BLOCK_START = "// Errors (generated from hashmesh.core.catalogue by protos/generate.py; see"
BLOCK_END_PREFIX = "service "


def proto_block(service: str) -> list[str]:
    """The "Errors" comment lines for ``service`` (``HashService``), ending a service comment."""
    lines = [
        BLOCK_START,
        '// docs/errors.md). Every error carries google.rpc.ErrorInfo, domain "hashmesh.dev",',
        "// except those gRPC itself sends; CODE REASON: methods (details).",
    ]
    prefix = f"{service}."
    for entry in CATALOGUE:
        methods = [m[len(prefix) :] for m in entry.methods if m.startswith(prefix)]
        if not methods and entry.name != "UNIMPLEMENTED":
            continue
        ours = [m[len(prefix) :] for m in EVERY if m.startswith(prefix)]
        scope = "every method" if methods == ours or not methods else ", ".join(methods)
        extra = [d for d in entry.details if d != "ErrorInfo"]
        tail = f" ({', '.join(extra)})" if extra else ""
        origin = " [sent by gRPC, no ErrorInfo]" if entry.origin == "gRPC" else ""
        text = f"- {entry.code} {entry.name}: {scope}{tail}{origin}."
        wrapped = textwrap.wrap(text, 96, subsequent_indent="  ")
        lines.extend(f"// {line}" for line in wrapped)
    return lines


def with_error_blocks(proto: str) -> str:
    """``proto`` with each service's generated block replaced (or appended to its comment)."""
    lines = proto.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(BLOCK_START):
            while not lines[index].startswith(BLOCK_END_PREFIX):
                index += 1
            continue
        if line.startswith(BLOCK_END_PREFIX):
            service = line.split()[1]
            if out and out[-1].startswith("//") and out[-1] != "//":
                out.append("//")
            out.extend(proto_block(service))
        out.append(line)
        index += 1
    return "\n".join(out)


def markdown() -> str:
    """docs/errors.md."""
    out = [
        "# Error catalogue",
        "",
        "<!-- Generated from core/catalogue.py by protos/generate.py; do not edit. -->",
        "",
        "Every status the mesh answers. Each carries `google.rpc.ErrorInfo` with domain",
        f"`{DOMAIN}` and the reason below (except the few gRPC itself sends), packed with the",
        "other details in the `grpc-status-details-bin` trailer (`google.rpc.Status`). Branch on",
        "`ErrorInfo.reason`, not on the message text. Refusals that may be retried also carry",
        "`retry-after` (whole seconds, rounded up) and `grpc-retry-pushback-ms` (gRFC A6) in",
        "the trailers. How to decode them in each language: [clients.md](clients.md).",
        "",
        "| Code | Reason | From | When | Details | Retry? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in CATALOGUE:
        details = ", ".join(e.details) if e.details else "none"
        reason = f"`{e.name}`" if e.has_error_info else f"({e.name}, no ErrorInfo)"
        out.append(
            f"| `{e.code}` | {reason} | {e.origin} | {e.when} | {details} | {e.retry.value} |"
        )
    out += ["", "## By method", ""]
    for method in EVERY:
        reasons = ", ".join(f"`{e.code}` {e.name}" for e in entries_for(method))
        out.append(f"- **{method}**: {reasons}.")
    out += [
        "",
        "Every method may also answer `UNIMPLEMENTED` (unknown method, from gRPC) and, when",
        "the client's own deadline passes, `DEADLINE_EXCEEDED` from the client library.",
        "",
        "## Safe to retry",
        "",
        "Whether a method may be sent again when the first attempt may have taken effect",
        "(`UNAVAILABLE` from a replica, `DEADLINE_EXCEEDED`, a lost connection). Refusals whose",
        "retry column says the call never reached a replica are safe for every method.",
        "",
        "| Method | Safe to retry |",
        "| --- | --- |",
    ]
    out += [f"| {method} | {SAFE_TO_RETRY[method]} |" for method in EVERY]
    return "\n".join(out) + "\n"
