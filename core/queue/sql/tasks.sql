-- Every statement about tasks and workers, loaded once by hashmesh.core.queue.store.
-- A section starts with "-- name: <query>"; parameters are psycopg named placeholders.
--
-- Worker-side writes (claim, complete, fail, release, acknowledge_cancel, heartbeat, reclaim)
-- commit without waiting for the WAL flush: `async_commit` sets synchronous_commit = off for
-- their own transaction only. Losing one on a database crash means a task runs again (its
-- lease is gone with the crash, or expires), never that an accepted submission is lost: the
-- submission itself and the caller's own transitions (cancel, requeue) stay synchronous, and
-- any later synchronous commit flushes the earlier asynchronous ones too. workerd/README.md.

-- Fencing: a worker's write names the lease it holds (`t.lease_id = …`). A task has a lease
-- exactly while it runs (every statement that ends a run clears it; CHECK constraint
-- hashmesh_tasks_lease_only_running, migration 0007), so the lease alone says "still running,
-- still yours". The statements do not also test `status = 'running'`: that clause lets the
-- planner answer them from a partial index of running rows (hashmesh_tasks_leases,
-- hashmesh_tasks_unfinished), read whole, dead entries included, where the primary key finds
-- the few rows named — and a plan made while the table was small stays cached.

-- name: submit
-- One statement for a whole batch: all rows are stored or none. The rows come as one JSON array
-- (bytea as "\x…" hex; a key left out is NULL). Ids are made by the caller so the answer maps
-- back to the request's order; a repeated (client_id, idempotency_key) is skipped here and read
-- back by `by_idempotency_keys`. Only what the database chose comes back: the caller has the rest.
INSERT INTO hashmesh_tasks (id, algorithm, input, input_key_id, input_size, params, priority,
                            max_attempts, run_after, client_id, idempotency_key, status,
                            result_digest, result_encoded, cached, finished_at,
                            idempotency_fingerprint)
SELECT s.id, s.algorithm, s.input, s.input_key_id, s.input_size, s.params, s.priority,
       s.max_attempts, coalesce(s.run_after, now()), s.client_id, s.idempotency_key,
       coalesce(s.status, 'pending'), s.result_digest, s.result_encoded,
       s.status IS NOT DISTINCT FROM 'succeeded',
       CASE WHEN s.status = 'succeeded' THEN now() END, s.fingerprint
FROM ROWS FROM (json_to_recordset(%(rows)s::json) AS (
         id uuid, algorithm text, input bytea, input_key_id text, input_size bigint,
         params jsonb, priority integer, max_attempts integer, run_after timestamptz,
         client_id text, idempotency_key text, status text, result_digest bytea,
         result_encoded text, fingerprint bytea))
     WITH ORDINALITY AS s(id, algorithm, input, input_key_id, input_size, params, priority,
                          max_attempts, run_after, client_id, idempotency_key, status,
                          result_digest, result_encoded, fingerprint, ord)
ORDER BY s.ord
ON CONFLICT (client_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, created_at, run_after, finished_at

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
-- One range of the claim index per priority that has waiting rows (`levels`, a loose index
-- scan): a single range over (priority DESC, run_after) would read past every row scheduled
-- for later before reaching the next priority, which with a large scheduled backlog made each
-- claim read the whole backlog. Cost: a few probes per distinct waiting priority.
-- The UPDATE names its rows as an array (`t.id = ANY(ARRAY(…))`): joined to `picked`, whose
-- size the planner can only guess from the LIMIT, it hash-joined a scan of the whole primary
-- key on a table of a few thousand rows (every bench scenario, a new database) and kept that
-- plan for the connection's life: each claim read every row ever stored (3,000 rows: 1.2 ms
-- of a 1.9 ms claim). The array is probed in the primary key, row by row.
WITH RECURSIVE async_commit AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'off', true)
), levels AS (
    (SELECT priority FROM hashmesh_tasks
     WHERE status IN ('pending', 'retrying') ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT t.priority FROM hashmesh_tasks t
            WHERE t.status IN ('pending', 'retrying') AND t.priority < levels.priority
            ORDER BY t.priority DESC LIMIT 1)
    FROM levels WHERE levels.priority IS NOT NULL
), picked AS (
    SELECT due.id FROM levels, LATERAL (
        SELECT id, priority, run_after FROM hashmesh_tasks
        WHERE status IN ('pending', 'retrying') AND priority = levels.priority
          AND run_after <= now()
        ORDER BY priority DESC, run_after, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED) AS due
    ORDER BY due.priority DESC, due.run_after, due.id
    LIMIT %(limit)s
), claimed AS (
    UPDATE hashmesh_tasks t
    SET status = 'running', attempts = t.attempts + 1, worker = %(worker)s,
        worker_session = %(session)s::bigint, lease_id = nextval('hashmesh_lease_seq'),
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
        started_at = now(), updated_at = now()
    FROM async_commit WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id, t.algorithm, t.input, t.input_key_id, t.params, t.attempts,
              t.max_attempts, t.lease_id, t.cancel_requested, t.priority, t.run_after,
              t.client_id
)
SELECT * FROM claimed ORDER BY priority DESC, run_after, id

-- name: next_due
-- Seconds until the next waiting task is due (negative: due now; NULL: none waiting); the same
-- loose index scan as `queue_summary`, so a million waiting rows cost a few probes.
WITH RECURSIVE heads AS (
    (SELECT priority, run_after FROM hashmesh_tasks
     WHERE status IN ('pending', 'retrying')
     ORDER BY priority DESC, run_after, id LIMIT 1)
    UNION ALL
    SELECT next.priority, next.run_after
    FROM heads, LATERAL (
        SELECT priority, run_after FROM hashmesh_tasks
        WHERE status IN ('pending', 'retrying') AND priority < heads.priority
        ORDER BY priority DESC, run_after, id LIMIT 1) AS next
)
SELECT extract(epoch FROM min(run_after) - now())::float8 AS wait FROM heads

-- name: complete
-- Fenced: only the lease holder's result is written; a cancellation asked meanwhile wins.
-- Rows are locked in id order (as in `fail` and `heartbeat`) so that a heartbeat and a write
-- of the same worker never deadlock. The results come as one JSON array (digest as "\x…"
-- hex), as in `submit`: four array parameters cost the worker ~6x more Python to send.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
d AS MATERIALIZED (
    SELECT * FROM json_to_recordset(%(rows)s::json)
        AS d(id uuid, lease_id bigint, digest bytea, encoded text)
),
locked AS MATERIALIZED (
    SELECT id FROM hashmesh_tasks WHERE id = ANY(ARRAY(SELECT id FROM d)) ORDER BY id FOR UPDATE
)
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'succeeded' END,
    result_digest = CASE WHEN t.cancel_requested THEN NULL ELSE d.digest END,
    result_encoded = CASE WHEN t.cancel_requested THEN NULL ELSE d.encoded END,
    completions = t.completions + CASE WHEN t.cancel_requested THEN 0 ELSE 1 END,
    finished_at = now(), updated_at = now(), lease_id = NULL, lease_expires_at = NULL,
    input = CASE WHEN t.algorithm = 'argon2id' THEN NULL ELSE t.input END
FROM d, locked, async_commit
WHERE t.id = ANY(ARRAY(SELECT id FROM locked)) AND locked.id = d.id AND t.id = d.id
  AND t.lease_id = d.lease_id
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: fail
-- Fenced like `complete`. Another attempt waits base * 2^(attempt-1) seconds, capped, with
-- "equal jitter" (between half and all of it); after the last attempt: DEAD_LETTER.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
locked AS MATERIALIZED (
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
    CROSS JOIN async_commit
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
WHERE t.id = f.id AND t.lease_id = f.lease_id
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: release
-- Hand back tasks a stopping worker never started: the attempt did not happen.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'pending' END,
    finished_at = CASE WHEN t.cancel_requested THEN now() END,
    attempts = greatest(t.attempts - 1, 0), worker = NULL, started_at = NULL,
    input = CASE WHEN t.cancel_requested AND t.algorithm = 'argon2id' THEN NULL ELSE t.input END,
    lease_id = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS r(id, lease_id), async_commit
WHERE t.id = r.id AND t.lease_id = r.lease_id
RETURNING t.id

-- name: acknowledge_cancel
-- The worker stopped a task whose cancellation was asked while it ran.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
UPDATE hashmesh_tasks t
SET status = 'cancelled', finished_at = now(), updated_at = now(),
    lease_id = NULL, lease_expires_at = NULL,
    input = CASE WHEN t.algorithm = 'argon2id' THEN NULL ELSE t.input END
FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS r(id, lease_id), async_commit
WHERE t.id = r.id AND t.lease_id = r.lease_id AND t.cancel_requested
RETURNING t.id

-- name: heartbeat
-- Renew the leases the worker still holds and record the worker's liveness in one round trip.
-- Returns the tasks whose lease was renewed; one missing from the answer is no longer ours.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
locked AS MATERIALIZED (
    SELECT id FROM hashmesh_tasks WHERE id = ANY(%(id)s::uuid[]) ORDER BY id FOR UPDATE
), renewed AS (
    UPDATE hashmesh_tasks t
    SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    FROM unnest(%(id)s::uuid[], %(lease_id)s::bigint[]) AS h(id, lease_id), locked, async_commit
    WHERE locked.id = h.id AND t.id = h.id AND t.lease_id = h.lease_id
    RETURNING t.id, t.cancel_requested
), seen AS (
    UPDATE hashmesh_workers
    SET last_heartbeat = now(), in_flight = %(in_flight)s, processed = %(processed)s
    FROM async_commit
    WHERE name = %(worker)s
    RETURNING name
)
SELECT id, cancel_requested FROM renewed

-- name: reclaim_lost
-- Put back tasks whose holder is gone: its session lock (26733, session) is no longer in
-- pg_locks (PostgreSQL dropped its connection: killed, crashed, host lost), or it stopped
-- renewing its lease (alive but stuck, or a session-less holder). One caller at a time does
-- the work (advisory transaction lock (26734, 1)); the others return nothing. For the first
-- seconds after the server (re)starts, every session is missing until its worker reconnects,
-- so only expired leases count then. Fencing (`lease_id`) makes a late write of the old holder
-- change nothing.
WITH async_commit AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)),
elected AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(26734, 1) AS ok),
live AS MATERIALIZED (
    SELECT objid::bigint AS session FROM pg_locks
    WHERE locktype = 'advisory' AND classid = 26733 AND objsubid = 2 AND granted
), settled AS MATERIALIZED (
    SELECT pg_postmaster_start_time() < now() - make_interval(secs => %(settle_seconds)s) AS ok
), lost AS (
    SELECT t.id, t.lease_expires_at < now() AS expired
    FROM hashmesh_tasks t, elected, settled
    WHERE elected.ok AND t.status = 'running'
      AND (t.lease_expires_at < now()
           OR (settled.ok AND t.worker_session IS NOT NULL
               AND t.worker_session NOT IN (SELECT session FROM live)))
    LIMIT 1000
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE hashmesh_tasks t
SET status = CASE WHEN t.cancel_requested THEN 'cancelled'
                  WHEN t.attempts >= t.max_attempts THEN 'dead_letter'
                  ELSE 'retrying' END,
    last_error = CASE WHEN lost.expired
                      THEN 'lease expired: worker ' || coalesce(t.worker, '?')
                           || ' stopped renewing it'
                      ELSE 'worker lost: ' || coalesce(t.worker, '?')
                           || ' lost its database session (process or host gone)' END,
    failures = t.failures || jsonb_build_object(
        'attempt', t.attempts, 'worker', t.worker, 'started_at', t.started_at,
        'failed_at', now(),
        'error', CASE WHEN lost.expired THEN 'lease expired' ELSE 'worker lost' END,
        'retry_at', now()),
    run_after = now(),
    finished_at = CASE WHEN t.cancel_requested OR t.attempts >= t.max_attempts THEN now() END,
    input = CASE WHEN (t.cancel_requested OR t.attempts >= t.max_attempts)
                      AND t.algorithm = 'argon2id' THEN NULL ELSE t.input END,
    lease_id = NULL, lease_expires_at = NULL, worker_session = NULL, updated_at = now()
FROM lost, async_commit
WHERE t.id = lost.id
RETURNING t.id, t.algorithm, t.status,
          extract(epoch FROM t.finished_at - t.created_at)::float8 AS latency_seconds

-- name: open_session
-- Run on the worker's own LISTEN connection: a fresh session id, locked for as long as that
-- connection lives (never blocks: nobody else ever holds a fresh id).
SELECT s.id AS session, pg_advisory_lock(26733, s.id::int4)::text AS locked
FROM (SELECT nextval('hashmesh_worker_session_seq') AS id) AS s

-- name: register_worker
INSERT INTO hashmesh_workers (name, host, pid, session)
VALUES (%(name)s, %(host)s, %(pid)s, %(session)s::bigint)
ON CONFLICT (name) DO UPDATE
SET host = excluded.host, pid = excluded.pid, session = excluded.session, started_at = now(),
    last_heartbeat = now(), in_flight = 0, processed = 0, stopped_at = NULL

-- name: worker_session
-- The worker's LISTEN connection was reopened under a new session.
UPDATE hashmesh_workers SET session = %(session)s::bigint WHERE name = %(name)s

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
-- O(1) in the table's size: the counters kept by the triggers of migration 0006.
SELECT status, sum(n)::bigint AS n FROM hashmesh_task_counts GROUP BY status

-- name: queue_summary
-- The longest a due task has waited to be claimed, read from the claim index one priority
-- at a time (a loose index scan: as many probes as there are distinct priorities waiting),
-- and what finished in the last minute, to the second (the ring of migration 0009: at most
-- 61 x 16 small rows, whatever the throughput).
WITH RECURSIVE heads AS (
    (SELECT priority, run_after FROM hashmesh_tasks
     WHERE status IN ('pending', 'retrying')
     ORDER BY priority DESC, run_after, id LIMIT 1)
    UNION ALL
    SELECT next.priority, next.run_after
    FROM heads, LATERAL (
        SELECT priority, run_after FROM hashmesh_tasks
        WHERE status IN ('pending', 'retrying') AND priority < heads.priority
        ORDER BY priority DESC, run_after, id LIMIT 1) AS next
)
SELECT
    (SELECT extract(epoch FROM now() - min(run_after))::float8 FROM heads
      WHERE run_after <= now()) AS oldest_pending_seconds,
    (SELECT coalesce(sum(n), 0)::bigint FROM hashmesh_task_finished
      WHERE second > floor(extract(epoch FROM now()))::bigint - 60) AS completed_last_minute

-- name: workers
-- Alive: not stopped, a recent heartbeat, and its session lock held (a killed worker shows
-- as dead at once; a worker from before sessions existed has none).
SELECT name, host, pid, started_at, last_heartbeat, in_flight, processed,
       (stopped_at IS NULL
        AND last_heartbeat > now() - make_interval(secs => %(alive_seconds)s)
        AND (session IS NULL OR session IN (
            SELECT objid::bigint FROM pg_locks
            WHERE locktype = 'advisory' AND classid = 26733 AND objsubid = 2 AND granted)))
       AS alive
FROM hashmesh_workers
ORDER BY alive DESC, name

-- name: unfinished_by_client
-- O(clients), not O(tasks): the triggers' per-client counters.
SELECT client_id, sum(n)::bigint AS n FROM hashmesh_client_unfinished
GROUP BY client_id HAVING sum(n) > 0

-- name: prune
-- Retention: delete up to %(batch)s finished tasks of one status that finished before the
-- cutoff, oldest first, skipping rows another transaction holds, so no lock is held for long.
DELETE FROM hashmesh_tasks
WHERE id IN (SELECT id FROM hashmesh_tasks
             WHERE status = %(status)s AND finished_at IS NOT NULL
               AND finished_at < now() - make_interval(secs => %(age_seconds)s)
             ORDER BY finished_at
             LIMIT %(batch)s
             FOR UPDATE SKIP LOCKED)
  AND status = %(status)s
RETURNING id

-- name: prune_preview
-- What `prune` would delete now (for `hashctl task prune --dry-run`), and the oldest of it.
SELECT count(*) AS n, min(finished_at) AS oldest FROM hashmesh_tasks
WHERE status = %(status)s AND finished_at IS NOT NULL
  AND finished_at < now() - make_interval(secs => %(age_seconds)s)

-- name: compact_task_counts
-- Fold the counters' slots into slot 0 (run by the pruner): the table stays about one row per
-- status. One statement, so a concurrent change is neither lost nor counted twice.
WITH moved AS (
    DELETE FROM hashmesh_task_counts WHERE slot <> 0 RETURNING status, n
)
INSERT INTO hashmesh_task_counts AS c (status, slot, n)
SELECT status, 0, sum(n) FROM moved GROUP BY status ORDER BY status
ON CONFLICT (status, slot) DO UPDATE SET n = c.n + excluded.n

-- name: compact_client_counts
-- The same per client; then rows at zero go, so clients without unfinished work cost nothing.
WITH moved AS (
    DELETE FROM hashmesh_client_unfinished WHERE slot <> 0 RETURNING client_id, n, cost
), folded AS (
    INSERT INTO hashmesh_client_unfinished AS u (client_id, slot, n, cost)
    SELECT client_id, 0, sum(n), sum(cost) FROM moved GROUP BY client_id ORDER BY client_id
    ON CONFLICT (client_id, slot) DO UPDATE SET n = u.n + excluded.n, cost = u.cost + excluded.cost
    RETURNING client_id
)
SELECT count(*) AS folded FROM folded

-- name: drop_zero_counters
WITH clients AS (DELETE FROM hashmesh_client_unfinished WHERE n = 0 AND cost = 0 RETURNING 1),
     statuses AS (DELETE FROM hashmesh_task_counts WHERE n = 0 RETURNING 1)
SELECT (SELECT count(*) FROM clients) + (SELECT count(*) FROM statuses) AS dropped

-- name: unfinished_cost_by_client
-- Queued work per client in the units of core.tasks.limits.task_cost (migration 0006's
-- hashmesh_task_cost, summed by the same triggers as the counts): O(clients), not O(tasks).
SELECT client_id, sum(cost)::bigint AS cost FROM hashmesh_client_unfinished
GROUP BY client_id HAVING sum(n) > 0

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
