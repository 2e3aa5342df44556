-- The rule 0007 added NOT VALID, checked on the rows written before it. VALIDATE CONSTRAINT
-- takes SHARE UPDATE EXCLUSIVE: submissions, claims and completions go on while it reads the
-- table (PostgreSQL docs, ALTER TABLE, "VALIDATE CONSTRAINT").
ALTER TABLE hashmesh_tasks VALIDATE CONSTRAINT hashmesh_tasks_lease_only_running;
