-- Task inputs sealed at rest (issue 10): hashd stores nonce || AES-256-GCM ciphertext || tag
-- in `input` and the id of the key that sealed it here; workerd opens it before hashing.
-- NULL: the input is not sealed (a digest task submitted without keys), or there is none.
ALTER TABLE hashmesh_tasks ADD COLUMN input_key_id text;

-- Passwords stored in clear before this migration cannot be sealed here (the database never
-- holds a key): the unfinished argon2 tasks that hold one end now, their input erased.
UPDATE hashmesh_tasks
SET status = 'dead_letter', input = NULL, finished_at = now(), updated_at = now(),
    lease_id = NULL, lease_expires_at = NULL,
    last_error = 'input erased by migration 0004: it was stored in clear; submit the task again'
WHERE algorithm = 'argon2id' AND input IS NOT NULL;

-- From now on no statement can store an argon2 input in clear (an older hashd during a rolling
-- upgrade, a hand-written INSERT): it must carry the id of the key that sealed it.
ALTER TABLE hashmesh_tasks ADD CONSTRAINT hashmesh_tasks_secret_sealed
    CHECK (algorithm <> 'argon2id' OR input IS NULL OR input_key_id IS NOT NULL);

-- Key rotation asks "does any row still need key X?" (README, "Task input at rest").
CREATE INDEX hashmesh_tasks_input_key ON hashmesh_tasks (input_key_id)
    WHERE input IS NOT NULL AND input_key_id IS NOT NULL;
