-- The queue as it ages (issue 12): counters that make counts O(1), worker sessions that make a
-- dead worker visible at once, and an index for retention.

-- Writers wait while the counters are initialised, so none is missed or counted twice.
LOCK TABLE hashmesh_tasks IN SHARE ROW EXCLUSIVE MODE;

-- Counts by status, kept by statement-level triggers in the transaction that changes them.
-- Each status has up to 16 slot rows (the writing backend's pid mod 16), so concurrent writers
-- rarely wait on one hot row; a count is the sum over its slots.
CREATE TABLE hashmesh_task_counts (
    status text   NOT NULL,
    slot   int    NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (status, slot)
);

-- Unfinished (pending, retrying, running) tasks per client, and their queued work in the units
-- of core.tasks.limits.task_cost, for backpressure; same slots.
CREATE TABLE hashmesh_client_unfinished (
    client_id text   NOT NULL,
    slot      int    NOT NULL,
    n         bigint NOT NULL,
    cost      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (client_id, slot)
);

-- core.tasks.limits.task_cost in SQL (keep the two alike): argon2id fills memory_cost_kib KiB
-- time_cost times (bytes), a digest reads its input once; each task 4096 more. A parameter
-- missing (rows written by hand) counts 0: no write may fail for the sake of a counter.
CREATE FUNCTION hashmesh_task_cost(algorithm text, params jsonb, input_size bigint)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN algorithm = 'argon2id'
                THEN coalesce((params->>'time_cost')::bigint, 0)
                     * coalesce((params->>'memory_cost_kib')::bigint, 0) * 1024
                ELSE coalesce(input_size, 0) END + 4096
$$;

INSERT INTO hashmesh_task_counts (status, slot, n)
SELECT status, 0, count(*) FROM hashmesh_tasks GROUP BY status;

INSERT INTO hashmesh_client_unfinished (client_id, slot, n, cost)
SELECT client_id, 0, count(*), sum(hashmesh_task_cost(algorithm, params, input_size))
FROM hashmesh_tasks
WHERE status IN ('pending', 'retrying', 'running') GROUP BY client_id;

-- Applies one statement's changes: +1 per new row, -1 per old row, by status (and by client
-- for unfinished ones). Rows are upserted in key order so two writers never deadlock.
CREATE FUNCTION hashmesh_tasks_apply_counts(deltas jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO hashmesh_task_counts AS c (status, slot, n)
    SELECT d.status, pg_backend_pid() % 16, sum(d.delta)
    FROM jsonb_to_recordset(deltas) AS d(status text, client_id text, delta bigint, cost bigint)
    GROUP BY d.status HAVING sum(d.delta) <> 0
    ORDER BY d.status
    ON CONFLICT (status, slot) DO UPDATE SET n = c.n + excluded.n;
    INSERT INTO hashmesh_client_unfinished AS u (client_id, slot, n, cost)
    SELECT d.client_id, pg_backend_pid() % 16, sum(d.delta), sum(d.cost)
    FROM jsonb_to_recordset(deltas) AS d(status text, client_id text, delta bigint, cost bigint)
    WHERE d.status IN ('pending', 'retrying', 'running')
    GROUP BY d.client_id HAVING sum(d.delta) <> 0 OR sum(d.cost) <> 0
    ORDER BY d.client_id
    ON CONFLICT (client_id, slot) DO UPDATE SET n = u.n + excluded.n, cost = u.cost + excluded.cost;
$$;

CREATE FUNCTION hashmesh_tasks_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deltas jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT jsonb_agg(d) INTO deltas FROM (
            SELECT status, client_id, count(*) AS delta,
                   sum(hashmesh_task_cost(algorithm, params, input_size)) AS cost
            FROM new_rows GROUP BY 1, 2) d;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT jsonb_agg(d) INTO deltas FROM (
            SELECT status, client_id, -count(*) AS delta,
                   -sum(hashmesh_task_cost(algorithm, params, input_size)) AS cost
            FROM old_rows GROUP BY 1, 2) d;
    ELSE
        -- Most updates (lease renewals) change no status: nothing to write.
        SELECT jsonb_agg(d) INTO deltas FROM (
            SELECT status, client_id, sum(delta) AS delta, sum(cost) AS cost FROM (
                SELECT n.status, n.client_id, 1 AS delta,
                       hashmesh_task_cost(n.algorithm, n.params, n.input_size) AS cost
                FROM new_rows n JOIN old_rows o ON o.id = n.id
                WHERE n.status <> o.status
                UNION ALL
                SELECT o.status, o.client_id, -1,
                       -hashmesh_task_cost(o.algorithm, o.params, o.input_size)
                FROM new_rows n JOIN old_rows o ON o.id = n.id
                WHERE n.status <> o.status) changed
            GROUP BY 1, 2) d;
    END IF;
    IF deltas IS NOT NULL THEN
        PERFORM hashmesh_tasks_apply_counts(deltas);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER hashmesh_tasks_count_insert
    AFTER INSERT ON hashmesh_tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_count();
CREATE TRIGGER hashmesh_tasks_count_update
    AFTER UPDATE ON hashmesh_tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_count();
CREATE TRIGGER hashmesh_tasks_count_delete
    AFTER DELETE ON hashmesh_tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_count();

CREATE FUNCTION hashmesh_tasks_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM hashmesh_task_counts;
    DELETE FROM hashmesh_client_unfinished;
    RETURN NULL;
END $$;

CREATE TRIGGER hashmesh_tasks_count_truncate
    AFTER TRUNCATE ON hashmesh_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_count_truncate();

-- Worker sessions: a workerd holds the session-level advisory lock (26733, session) on its
-- LISTEN connection for as long as that connection lives, and stamps the tasks it claims with
-- the session. When PostgreSQL drops the connection (process killed, host lost and TCP keepalive
-- expired) the lock disappears from pg_locks and the reaper puts those tasks back at once.
CREATE SEQUENCE hashmesh_worker_session_seq MAXVALUE 2147483647 CYCLE;
ALTER TABLE hashmesh_tasks ADD COLUMN worker_session bigint;
ALTER TABLE hashmesh_workers ADD COLUMN session bigint;

-- Retention deletes the oldest finished tasks of one status at a time; this replaces the
-- finished_at index (the last-minute count reads it by status too).
CREATE INDEX hashmesh_tasks_retention
    ON hashmesh_tasks (status, finished_at) WHERE finished_at IS NOT NULL;
DROP INDEX hashmesh_tasks_finished;

-- Status notifications carry the task as stored (the columns of a TaskRecord, never the input
-- or params), so hashd's watch hub answers WatchTask without reading the table again. Payload:
-- a JSON array; an entry over 3000 bytes (a long last_error) is sent as {"id", "status"} and
-- read back by the hub. Chunks stay under 7500 bytes (the limit is 8000).
CREATE OR REPLACE FUNCTION hashmesh_tasks_notify_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT '[' || string_agg(sized.entry, ',' ORDER BY sized.ord) || ']'
        FROM (SELECT e.ord, e.entry,
                     sum(octet_length(e.entry) + 1) OVER (ORDER BY e.ord) / 4500 AS grp
              FROM (SELECT row_number() OVER () AS ord,
                           CASE WHEN octet_length(f.full_entry) <= 3000 THEN f.full_entry
                                ELSE json_build_object('id', n.id, 'status', n.status)::text
                           END AS entry
                    FROM new_rows n JOIN old_rows o ON o.id = n.id
                    CROSS JOIN LATERAL (SELECT json_build_object(
                        'id', n.id, 'algorithm', n.algorithm, 'status', n.status,
                        'priority', n.priority, 'attempts', n.attempts,
                        'max_attempts', n.max_attempts, 'client_id', n.client_id,
                        'idempotency_key', n.idempotency_key, 'input_size', n.input_size,
                        'result_digest', encode(n.result_digest, 'hex'),
                        'result_encoded', n.result_encoded, 'cached', n.cached,
                        'last_error', n.last_error, 'created_at', n.created_at,
                        'run_after', n.run_after, 'started_at', n.started_at,
                        'finished_at', n.finished_at, 'worker', n.worker,
                        'cancel_requested', n.cancel_requested)::text AS full_entry) AS f
                    WHERE n.status <> o.status OR n.cancel_requested <> o.cancel_requested) AS e
             ) AS sized
        GROUP BY sized.grp
    LOOP
        PERFORM pg_notify('hashmesh_task_status', chunk);
    END LOOP;
    PERFORM hashmesh_tasks_notify_ready(
        (SELECT min(n.run_after) FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.status IN ('pending', 'retrying') AND n.status <> o.status));
    RETURN NULL;
END $$;

-- Ids made by the database (rows inserted by hand or by tools) are time-ordered UUIDv7 too, as
-- the store's are (hashmesh.core.queue.model.new_task_id): the primary key then grows at its
-- right edge instead of touching a random page of a large index for every insert.
CREATE FUNCTION hashmesh_uuid7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp())
                                                     * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;
ALTER TABLE hashmesh_tasks ALTER COLUMN id SET DEFAULT hashmesh_uuid7();
