-- The task queue's wake-ups and audit columns (issue 4).

-- How many times a result was written for the task; fencing keeps it at most 1 (fault tests
-- assert it). One failed attempt per element of `failures` (attempt, started_at, failed_at,
-- error, retry_at), so backoff can be checked from the database, not from a test's clock.
ALTER TABLE hashmesh_tasks
    ADD COLUMN completions integer NOT NULL DEFAULT 0,
    ADD COLUMN failures    jsonb   NOT NULL DEFAULT '[]'::jsonb;

-- An argon2 input is a password: no statement may leave it behind in a final state.
ALTER TABLE hashmesh_tasks ADD CONSTRAINT hashmesh_tasks_secret_erased
    CHECK (algorithm <> 'argon2id' OR input IS NULL
           OR status NOT IN ('succeeded', 'cancelled', 'dead_letter'));

-- Backpressure counts unfinished tasks per client.
CREATE INDEX hashmesh_tasks_unfinished
    ON hashmesh_tasks (client_id) WHERE status IN ('pending', 'retrying', 'running');

-- Wake-ups are statement-level so a batch of 10,000 rows sends a handful of notifications:
--   hashmesh_tasks_ready   ('' or epoch)   : work is claimable now (or at that time); workerd listens.
--   hashmesh_task_status   "id status,id status,...": status changes; hashd's watch hub listens.
-- The ready payload is empty when work is due now, else the epoch (seconds) at which the
-- earliest of the rows becomes due, so workers set a timer instead of polling for it.
CREATE FUNCTION hashmesh_tasks_notify_ready(due timestamptz) RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('hashmesh_tasks_ready',
                     CASE WHEN due <= now() THEN '' ELSE extract(epoch FROM due)::text END)
    WHERE due IS NOT NULL
$$;

CREATE FUNCTION hashmesh_tasks_notify_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hashmesh_tasks_notify_ready(
        (SELECT min(run_after) FROM new_rows WHERE status IN ('pending', 'retrying')));
    RETURN NULL;
END $$;

CREATE FUNCTION hashmesh_tasks_notify_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    -- At most 100 entries (~4.5 kB) per notification: payloads are limited to 8000 bytes.
    FOR chunk IN
        SELECT string_agg(changed.id::text || ' ' || changed.status, ',')
        FROM (SELECT n.id, n.status, (row_number() OVER ()) / 100 AS grp
              FROM new_rows n JOIN old_rows o ON o.id = n.id
              WHERE n.status <> o.status OR n.cancel_requested <> o.cancel_requested) AS changed
        GROUP BY changed.grp
    LOOP
        PERFORM pg_notify('hashmesh_task_status', chunk);
    END LOOP;
    PERFORM hashmesh_tasks_notify_ready(
        (SELECT min(n.run_after) FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.status IN ('pending', 'retrying') AND n.status <> o.status));
    RETURN NULL;
END $$;

CREATE TRIGGER hashmesh_tasks_after_insert
    AFTER INSERT ON hashmesh_tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_notify_insert();

CREATE TRIGGER hashmesh_tasks_after_update
    AFTER UPDATE ON hashmesh_tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION hashmesh_tasks_notify_update();
