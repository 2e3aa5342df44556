-- Every statement about tasks and workers, loaded once by hashmesh.core.tasks.store.
-- A section starts with "-- name: <query>"; parameters are psycopg named placeholders.

-- name: submit
-- One statement for a whole batch: all rows are stored or none. Ids are made by the caller so
-- the answer maps back to the request's order; a repeated (client_id, idempotency_key) is
-- skipped here and read back by `by_idempotency_keys`.
INSERT INTO hashmesh_tasks (id, algorithm, input, input_key_id, input_size, params, priority,
                            max_attempts, run_after, client_id, idempotency_key, status,
                            result_digest, result_encoded, cached, finished_at,
                            idempotency_fingerprint)
SELECT s.id, s.algorithm, s.input, s.input_key_id, s.input_size, s.params::jsonb, s.priority,
       s.max_attempts, coalesce(s.run_after, now()), s.client_id, s.idempotency_key, s.status,
       s.result_digest, s.result_encoded, s.status = 'succeeded',
       CASE WHEN s.status = 'succeeded' THEN now() END, s.fingerprint
FROM unnest(%(id)s::uuid[], %(algorithm)s::text[], %(input)s::bytea[],
            %(input_key_id)s::text[], %(input_size)s::bigint[], %(params)s::text[],
            %(priority)s::integer[], %(max_attempts)s::integer[], %(run_after)s::timestamptz[],
            %(client_id)s::text[], %(idempotency_key)s::text[], %(status)s::text[],
            %(result_digest)s::bytea[], %(result_encoded)s::text[], %(fingerprint)s::bytea[])
     WITH ORDINALITY AS s(id, algorithm, input, input_key_id, input_size, params, priority,
                          max_attempts, run_after, client_id, idempotency_key, status,
                          result_digest, result_encoded, fingerprint, ord)
ORDER BY s.ord
ON CONFLICT (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {columns}

-- name: by_idempotency_keys
SELECT {columns}, idempotency_fingerprint FROM hashmesh_tasks
WHERE client_id = %(client_id)s AND idempotency_key = ANY(%(keys)s::text[])

-- name: live_keys
-- A caller's keys: those older than the window are forgotten (their tasks stay, keyless), the
-- others come back with their fingerprints. The SELECT reads the snapshot before the UPDATE,
-- so it filters by age itself
-- (a data-modifying WITH runs whether or not it is read).
WITH forgotten AS (
    UPDATE hashmesh_tasks SET idempotency_key = NULL, idempotency_fingerprint = NULL
    WHERE client_id = %(client_id)s AND idempotency_key = ANY(%(keys)s::text[])
      AND created_at < now() - make_interval(secs => %(window)s)
    RETURNING id
)
SELECT {columns}, idempotency_fingerprint FROM hashmesh_tasks
WHERE client_id = %(client_id)s AND idempotency_key = ANY(%(keys)s::text[])
  AND created_at >= now() - make_interval(secs => %(window)s)

-- name: get
-- Scoped: a task of another client reads as missing (%(owner)s NULL: an operator, every task).
SELECT {columns} FROM hashmesh_tasks
WHERE id = %(id)s AND (%(owner)s::text IS NULL OR client_id = %(owner)s::text)

-- name: get_many
SELECT {columns} FROM hashmesh_tasks WHERE id = ANY(%(ids)s::uuid[])

-- name: claim
-- Highest priority first, then the longest due; rows other workers hold are skipped. The
-- answer comes back in that order too, so the worker starts them in that order.
WITH picked AS (
    SELECT id FROM hashmesh_tasks
    WHERE status IN ('pending', 'retrying') AND run_after <= now()
    ORDER BY priority DESC, run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE hashmesh_tasks t
    SET status = 'running', attempts = t.attempts + 1, worker = %(worker)s,
        lease_id = nextval('hashmesh_lease_seq'),
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
        started_at = now(), updated_at = now()
    FROM picked WHERE t.id = picked.id
    RETURNING t.id, t.algorithm, t.input, t.input_key_id, t.params, t.attempts,
              t.max_attempts, t.lease_id, t.cancel_requested, t.priority, t.run_after,
              t.client_id
)
SELECT * FROM claimed ORDER BY priority DESC, run_after, id

-- name: next_due
-- Seconds until the next waiting task is due (negative: due now; NULL: none waiting).
SELECT extract(epoch FROM min(run_after) - now())::float8 AS wait
FROM hashmesh_tasks WHERE status IN ('pending', 'retrying')

-- name: complete
-- Fenced: only the lease holder's result is written; a cancellation asked meanwhile wins.
-- Rows are locked in id order (as in `fail` and `heartbeat`) so that a heartbeat and a write
-- of the same worker never deadlock.
WITH locked AS MATERIALIZED (
    SELECT id FROM hashmesh_tasks WHERE id = ANY(%(id)s::uuid[]) ORDER BY id FOR UPDATE
)
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'succeeded' END,
    result_digest = CASE WHEN t.cancel_requested THEN NULL ELSE d.digest END,
    result_encoded = CASE WHEN t.cancel_requested THEN NULL ELSE d.encoded END,
    completions = t.completions + CASE WHEN t.cancel_requested THEN 0 ELSE 1 END,
    finished_at = now(), updated_at = now(), lease_id = NULL, lease_expires_at = NULL,
    input = CASE WHEN t.algorithm = 'argon2id' THEN NULL ELSE t.input END
FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[], %(digest)s::bytea[], %(encoded)s::text[])
     AS d(id, lease_id, digest, encoded), locked
WHERE locked.id = d.id AND t.id = d.id AND t.lease_id = d.lease_id AND t.status = 'running'
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: fail
-- Fenced like `complete`. Another attempt waits base * 2^(attempt-1) seconds, capped, with
-- "equal jitter" (between half and all of it); after the last attempt: DEAD_LETTER.
WITH locked AS MATERIALIZED (
    SELECT id FROM hashmesh_tasks WHERE id = ANY(%(id)s::uuid[]) ORDER BY id FOR UPDATE
), failed AS (
    SELECT t.id, f.lease_id, f.error,
           CASE WHEN t.cancel_requested THEN 'cancelled'
                WHEN t.attempts >= t.max_attempts THEN 'dead_letter'
                ELSE 'retrying' END AS next_status,
           now() + make_interval(secs => least(%(cap)s::float8,
                   %(base)s::float8 * power(2.0, greatest(t.attempts - 1, 0)))
                   * (0.5 + random() / 2)) AS retry_at
    FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[], %(error)s::text[]) AS f(id, lease_id, error)
    JOIN locked l ON l.id = f.id
    JOIN hashmesh_tasks t ON t.id = f.id
)
UPDATE hashmesh_tasks t
SET status = f.next_status,
    last_error = f.error,
    run_after = CASE WHEN f.next_status = 'retrying' THEN f.retry_at ELSE t.run_after END,
    finished_at = CASE WHEN f.next_status = 'retrying' THEN NULL ELSE now() END,
    failures = t.failures || jsonb_build_object(
        'attempt', t.attempts, 'worker', t.worker, 'started_at', t.started_at,
        'failed_at', now(), 'error', f.error,
        'retry_at', CASE WHEN f.next_status = 'retrying' THEN f.retry_at END),
    updated_at = now(), lease_id = NULL, lease_expires_at = NULL,
    input = CASE WHEN f.next_status <> 'retrying' AND t.algorithm = 'argon2id'
                 THEN NULL ELSE t.input END
FROM failed f
WHERE t.id = f.id AND t.lease_id = f.lease_id AND t.status = 'running'
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: release
-- Hand back tasks a stopping worker never started: the attempt did not happen.
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN t.cancel_requested THEN now() END,
    attempts = greatest(t.attempts - 1, 0), worker = NULL, started_at = NULL,
    input = CASE WHEN t.cancel_requested AND t.algorithm = 'argon2id' THEN NULL ELSE t.input END,
    lease_id = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS r(id, lease_id)
WHERE t.id = r.id AND t.lease_id = r.lease_id AND t.status = 'running'
RETURNING t.id

-- name: acknowledge_cancel
-- The worker stopped a task whose cancellation was asked while it ran.
UPDATE hashmesh_tasks t
SET status = 'cancelled', finished_at = now(), updated_at = now(),
    lease_id = NULL, lease_expires_at = NULL,
    input = CASE WHEN t.algorithm = 'argon2id' THEN NULL ELSE t.input END
FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS r(id, lease_id)
WHERE t.id = r.id AND t.lease_id = r.lease_id AND t.status = 'running' AND t.cancel_requested
RETURNING t.id

-- name: heartbeat
-- Renew the leases the worker still holds and record the worker's liveness in one round trip.
-- Returns the tasks whose lease was renewed; one missing from the answer is no longer ours.
WITH locked AS MATERIALIZED (
    SELECT id FROM hashmesh_tasks WHERE id = ANY(%(id)s::uuid[]) ORDER BY id FOR UPDATE
), renewed AS (
    UPDATE hashmesh_tasks t
    SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS h(id, lease_id), locked
    WHERE locked.id = h.id AND t.id = h.id AND t.lease_id = h.lease_id AND t.status = 'running'
    RETURNING t.id, t.cancel_requested
), seen AS (
    UPDATE hashmesh_workers
    SET last_heartbeat = now(), in_flight = %(in_flight)s, processed = %(processed)s
    WHERE name = %(worker)s
    RETURNING name
)
SELECT id, cancel_requested FROM renewed

-- name: reclaim_expired
-- Put back tasks whose holder stopped renewing its lease (killed, host lost).
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled'
                  WHEN t.attempts >= t.max_attempts THEN 'dead_letter'
                  ELSE 'retrying' END,
    last_error = 'lease expired: worker ' || coalesce(t.worker, '?') || ' stopped renewing it',
    failures = t.failures || jsonb_build_object(
        'attempt', t.attempts, 'worker', t.worker, 'started_at', t.started_at,
        'failed_at', now(), 'error', 'lease expired', 'retry_at', now()),
    run_after = now(),
    finished_at = CASE WHEN t.cancel_requested OR t.attempts >= t.max_attempts THEN now() END,
    input = CASE WHEN (t.cancel_requested OR t.attempts >= t.max_attempts)
                      AND t.algorithm = 'argon2id' THEN NULL ELSE t.input END,
    lease_id = NULL, lease_expires_at = NULL, updated_at = now()
WHERE t.id IN (SELECT id FROM hashmesh_tasks
               WHERE status = 'running' AND lease_expires_at < now()
               LIMIT 1000 FOR UPDATE SKIP LOCKED)
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: register_worker
INSERT INTO hashmesh_workers (name, host, pid)
VALUES (%(name)s, %(host)s, %(pid)s)
ON CONFLICT (name) DO UPDATE
SET host = excluded.host, pid = excluded.pid, started_at = now(), last_heartbeat = now(),
    in_flight = 0, processed = 0, stopped_at = NULL

-- name: unregister_worker
UPDATE hashmesh_workers SET stopped_at = now(), in_flight = 0, processed = %(processed)s
WHERE name = %(name)s

-- name: cancel
-- Pending or retrying: CANCELLED at once. Running: flagged for the worker to stop it.
UPDATE hashmesh_tasks
SET status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
    cancel_requested = status = 'running',
    finished_at = CASE WHEN status = 'running' THEN NULL ELSE now() END,
    input = CASE WHEN status <> 'running' AND algorithm = 'argon2id' THEN NULL ELSE input END,
    updated_at = now()
WHERE id = %(id)s AND status IN ('pending', 'retrying', 'running')
  AND (%(owner)s::text IS NULL OR client_id = %(owner)s::text)
RETURNING {columns}

-- name: requeue
UPDATE hashmesh_tasks
SET status = 'pending', attempts = 0, run_after = now(), finished_at = NULL, started_at = NULL,
    cancel_requested = false, worker = NULL, last_error = NULL, updated_at = now()
WHERE id = %(id)s AND status IN ('dead_letter', 'cancelled') AND input IS NOT NULL
  AND (%(owner)s::text IS NULL OR client_id = %(owner)s::text)
RETURNING {columns}

-- name: list
-- Newest first; the page token is the (created_at, id) of the previous page's last row.
SELECT {columns} FROM hashmesh_tasks
WHERE (%(client_id)s::text IS NULL OR client_id = %(client_id)s::text)
  AND (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(algorithm)s::text IS NULL OR algorithm = %(algorithm)s::text)
  AND (%(after_created)s::timestamptz IS NULL
       OR (created_at, id) < (%(after_created)s::timestamptz, %(after_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- name: count_by_status
SELECT status, count(*) AS n FROM hashmesh_tasks GROUP BY status

-- name: queue_summary
SELECT
    (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM hashmesh_tasks
      WHERE status = 'pending' AND run_after <= now()) AS oldest_pending_seconds,
    (SELECT count(*) FROM hashmesh_tasks
      WHERE finished_at > now() - interval '60 seconds'
        AND status IN ('succeeded', 'dead_letter')) AS completed_last_minute

-- name: workers
SELECT name, host, pid, started_at, last_heartbeat, in_flight, processed,
       (stopped_at IS NULL
        AND last_heartbeat > now() - make_interval(secs => %(alive_seconds)s)) AS alive
FROM hashmesh_workers
ORDER BY alive DESC, name

-- name: unfinished_by_client
SELECT client_id, count(*) AS n FROM hashmesh_tasks
WHERE status IN ('pending', 'retrying', 'running')
GROUP BY client_id

-- name: unfinished_cost_by_client
-- Queued work per client, in the units of core.tasks.limits.task_cost (keep the two alike):
-- argon2id costs time_cost x memory (bytes of memory passes), a digest its input's bytes,
-- each task 4096 more.
SELECT client_id,
       sum(CASE WHEN algorithm = 'argon2id'
                THEN (params->>'time_cost')::bigint * (params->>'memory_cost_kib')::bigint * 1024
                ELSE input_size END + 4096)::bigint AS cost
FROM hashmesh_tasks
WHERE status IN ('pending', 'retrying', 'running')
GROUP BY client_id

-- name: input_key_usage
-- Key rotation (`hashctl keys usage`): rows holding an input sealed with each key. A key may
-- be dropped once no unfinished task needs it; finished rows only matter to `requeue`.
SELECT input_key_id AS key_id,
       count(*) FILTER (WHERE status IN ('pending', 'retrying', 'running')) AS unfinished,
       count(*) FILTER (WHERE status NOT IN ('pending', 'retrying', 'running')) AS finished
FROM hashmesh_tasks
WHERE input IS NOT NULL AND input_key_id IS NOT NULL
GROUP BY input_key_id
ORDER BY input_key_id
