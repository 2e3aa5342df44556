-- GetQueueStats without reading the last minute's rows (issue 12): completed_last_minute
-- counted the tasks finished in the last 60 s through the retention index, a read that grows
-- with the throughput (30,000 tasks finished in a minute: 1,400 heap pages, 19 ms of the
-- call's 20). The counter trigger now also counts each task reaching a final status into
-- the second it finished in: a ring of 64 one-second buckets (a bucket is reused, reset, by
-- the second 64 s later), in the same 16 slots as the status counters. The table never holds
-- more than 64 x 16 rows and needs no pruning; the read sums at most 61 x 16 of them.

-- Writers wait while the ring is filled, so none is missed or counted twice.
LOCK TABLE hashmesh_tasks IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE hashmesh_task_finished (
    ring   int    NOT NULL,  -- second % 64
    slot   int    NOT NULL,  -- the writing backend's pid % 16, as in hashmesh_task_counts
    second bigint NOT NULL,  -- the Unix second this bucket counts (the latest to use the ring)
    n      bigint NOT NULL,
    PRIMARY KEY (ring, slot)
);

INSERT INTO hashmesh_task_finished (ring, slot, second, n)
SELECT s % 64, 0, s, count(*) FROM (
    SELECT floor(extract(epoch FROM finished_at))::bigint AS s FROM hashmesh_tasks
    WHERE status IN ('succeeded', 'dead_letter')
      AND finished_at > now() - interval '64 seconds') x
GROUP BY s;

-- Counts tasks into the ring by the Unix second each finished in. A bucket's second only moves
-- forward: a transaction finishing a task in an older second than its bucket holds counts
-- nothing there (that second is 64 s or more in the past, outside any window read). PL/pgSQL,
-- as in 0007, so its plan is kept for the session.
CREATE FUNCTION hashmesh_task_finished_add(seconds bigint[], writer_slot int) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO hashmesh_task_finished AS f (ring, slot, second, n)
    SELECT s % 64, writer_slot, s, count(*) FROM unnest(seconds) AS s
    GROUP BY s ORDER BY s % 64
    ON CONFLICT (ring, slot) DO UPDATE
    SET n = CASE WHEN f.second = excluded.second THEN f.n + excluded.n
                 WHEN f.second < excluded.second THEN excluded.n
                 ELSE f.n END,
        second = greatest(f.second, excluded.second);
END $$;

-- 0007's counter trigger with the ring added (the same key order: statuses, clients, then the
-- ring in ring order, so two writers never deadlock).
CREATE OR REPLACE FUNCTION hashmesh_tasks_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    my_slot int := pg_backend_pid() % 16;
    finished bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO hashmesh_task_counts AS c (status, slot, n)
        SELECT status, my_slot, count(*) FROM new_rows GROUP BY status ORDER BY status
        ON CONFLICT (status, slot) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO hashmesh_client_unfinished AS u (client_id, slot, n, cost)
        SELECT client_id, my_slot, count(*),
               sum(hashmesh_task_cost(algorithm, params, input_size))
        FROM new_rows WHERE status IN ('pending', 'retrying', 'running')
        GROUP BY client_id ORDER BY client_id
        ON CONFLICT (client_id, slot) DO UPDATE
        SET n = u.n + excluded.n, cost = u.cost + excluded.cost;
        finished := ARRAY(
            SELECT floor(extract(epoch FROM finished_at))::bigint FROM new_rows
            WHERE status IN ('succeeded', 'dead_letter') AND finished_at IS NOT NULL);
        IF cardinality(finished) > 0 THEN
            PERFORM hashmesh_task_finished_add(finished, my_slot);
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO hashmesh_task_counts AS c (status, slot, n)
        SELECT status, my_slot, -count(*) FROM old_rows GROUP BY status ORDER BY status
        ON CONFLICT (status, slot) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO hashmesh_client_unfinished AS u (client_id, slot, n, cost)
        SELECT client_id, my_slot, -count(*),
               -sum(hashmesh_task_cost(algorithm, params, input_size))
        FROM old_rows WHERE status IN ('pending', 'retrying', 'running')
        GROUP BY client_id ORDER BY client_id
        ON CONFLICT (client_id, slot) DO UPDATE
        SET n = u.n + excluded.n, cost = u.cost + excluded.cost;
    ELSE
        -- Only status changes count; most other updates (lease renewals) write nothing.
        INSERT INTO hashmesh_task_counts AS c (status, slot, n)
        SELECT d.status, my_slot, sum(d.delta)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        CROSS JOIN LATERAL (VALUES (n.status, 1), (o.status, -1)) AS d(status, delta)
        WHERE n.status <> o.status
        GROUP BY d.status HAVING sum(d.delta) <> 0 ORDER BY d.status
        ON CONFLICT (status, slot) DO UPDATE SET n = c.n + excluded.n;
        -- A client's unfinished work changes only when a task enters or leaves the unfinished
        -- statuses (pending → running, the claim, changes neither).
        INSERT INTO hashmesh_client_unfinished AS u (client_id, slot, n, cost)
        SELECT n.client_id, my_slot, sum(d.delta),
               sum(d.delta * hashmesh_task_cost(n.algorithm, n.params, n.input_size))
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        CROSS JOIN LATERAL (VALUES (
            (n.status IN ('pending', 'retrying', 'running'))::int
            - (o.status IN ('pending', 'retrying', 'running'))::int)) AS d(delta)
        WHERE d.delta <> 0
        GROUP BY n.client_id
        HAVING sum(d.delta) <> 0
            OR sum(d.delta * hashmesh_task_cost(n.algorithm, n.params, n.input_size)) <> 0
        ORDER BY n.client_id
        ON CONFLICT (client_id, slot) DO UPDATE
        SET n = u.n + excluded.n, cost = u.cost + excluded.cost;
        -- Tasks reaching a final status, by the second they finished in.
        finished := ARRAY(
            SELECT floor(extract(epoch FROM n.finished_at))::bigint
            FROM new_rows n JOIN old_rows o ON o.id = n.id
            WHERE n.status IN ('succeeded', 'dead_letter') AND n.status <> o.status
              AND n.finished_at IS NOT NULL);
        IF cardinality(finished) > 0 THEN
            PERFORM hashmesh_task_finished_add(finished, my_slot);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION hashmesh_tasks_count_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM hashmesh_task_counts;
    DELETE FROM hashmesh_client_unfinished;
    DELETE FROM hashmesh_task_finished;
    RETURN NULL;
END $$;
