"""The durable task queue: the store (PostgreSQL, in-memory for unit tests) and its rules."""
