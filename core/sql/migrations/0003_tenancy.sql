-- Tenancy and Stripe-like idempotency (issue 10).

-- Keyed HMAC of a keyed submission's request (hashmesh.core.tasks.idempotency): a reuse of the
-- key with another request is refused. Never a bare hash: an argon2 input is a password.
-- NULL for tasks stored before this column, and for tasks without an idempotency key.
ALTER TABLE hashmesh_tasks ADD COLUMN idempotency_fingerprint bytea;
