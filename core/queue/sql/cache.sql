-- Every statement about the result cache's shared tier (table hashmesh_cache), loaded once by
-- hashmesh.core.queue.cache_table. A section starts with "-- name: <query>"; parameters are
-- psycopg named placeholders. Keys are 32-byte HMACs; the per-database secret is the one row
-- under another key (`secret_key`), expiring 'infinity', so the sweep never removes it.

-- name: lookup
-- A hit also counts the access; the remaining life lets the memory tier expire it together.
UPDATE hashmesh_cache
SET access_count = access_count + 1, last_accessed = now()
WHERE key = %(key)s AND expires_at > now()
RETURNING value, extract(epoch FROM expires_at - now()) AS ttl

-- name: store
INSERT INTO hashmesh_cache (key, value, expires_at)
VALUES (%(key)s, %(value)s, now() + make_interval(secs => %(ttl_seconds)s))
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at

-- name: sweep
-- In batches, so no statement runs long.
DELETE FROM hashmesh_cache WHERE key IN (
    SELECT key FROM hashmesh_cache WHERE expires_at < now() LIMIT %(batch)s)

-- name: count
SELECT count(*) AS n FROM hashmesh_cache WHERE expires_at > now() AND key <> %(secret_key)s

-- name: clear
DELETE FROM hashmesh_cache WHERE key <> %(secret_key)s

-- name: announce_clear
SELECT pg_notify(%(channel)s, %(sender)s)

-- name: secret_create
-- The first process to get here makes the secret; the others read the one it made.
INSERT INTO hashmesh_cache (key, value, expires_at)
VALUES (%(secret_key)s, %(value)s, 'infinity') ON CONFLICT (key) DO NOTHING

-- name: secret_read
SELECT value FROM hashmesh_cache WHERE key = %(secret_key)s
