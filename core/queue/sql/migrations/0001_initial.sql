-- Tasks, workers and the shared result cache.

CREATE TABLE hashmesh_tasks (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    algorithm        text        NOT NULL,
    -- The input; set to NULL when the task reaches a final state if it is a secret (argon2).
    input            bytea,
    input_size       bigint      NOT NULL,
    -- Algorithm parameters (argon2: time_cost, memory_cost_kib, parallelism, hash_len, salt b64).
    params           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status           text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'retrying', 'succeeded', 'cancelled', 'dead_letter')),
    priority         integer     NOT NULL DEFAULT 0,
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 5,
    client_id        text        NOT NULL DEFAULT 'anonymous',
    idempotency_key  text,
    result_digest    bytea,
    result_encoded   text,
    cached           boolean     NOT NULL DEFAULT false,
    last_error       text,
    run_after        timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The lease: only the holder of lease_id may complete the task (fencing).
    worker           text,
    lease_id         bigint,
    lease_expires_at timestamptz,
    cancel_requested boolean     NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX hashmesh_tasks_idempotency
    ON hashmesh_tasks (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Claim order: highest priority first, then oldest due.
CREATE INDEX hashmesh_tasks_claimable
    ON hashmesh_tasks (priority DESC, run_after, id) WHERE status IN ('pending', 'retrying');
CREATE INDEX hashmesh_tasks_leases
    ON hashmesh_tasks (lease_expires_at) WHERE status = 'running';
CREATE INDEX hashmesh_tasks_listing ON hashmesh_tasks (created_at DESC, id DESC);
CREATE INDEX hashmesh_tasks_client ON hashmesh_tasks (client_id, created_at DESC, id DESC);
CREATE INDEX hashmesh_tasks_finished ON hashmesh_tasks (finished_at) WHERE finished_at IS NOT NULL;

CREATE SEQUENCE hashmesh_lease_seq;

CREATE TABLE hashmesh_workers (
    name            text PRIMARY KEY,
    host            text        NOT NULL,
    pid             integer     NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat  timestamptz NOT NULL DEFAULT now(),
    in_flight       integer     NOT NULL DEFAULT 0,
    processed       bigint      NOT NULL DEFAULT 0,
    stopped_at      timestamptz
);

-- Shared result cache. The key is an HMAC of (algorithm, parameters, input) under a server
-- secret, so the table holds no input in clear and cannot be used as a lookup oracle.
CREATE TABLE hashmesh_cache (
    key            bytea PRIMARY KEY,
    value          bytea       NOT NULL,
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    access_count   bigint      NOT NULL DEFAULT 0,
    last_accessed  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX hashmesh_cache_expiry ON hashmesh_cache (expires_at);
