"""The durable task queue on PostgreSQL: the store protocol and its two implementations
(``store`` on PostgreSQL, ``memory`` for unit tests), the model, the task SQL (``sql/``), the
migrations and the one place that runs them, the pool and driver-error translation (``db``),
the result cache's shared table (``cache_table``, its SQL in ``sql/cache.sql``), sealing of
task inputs at rest, pending limits, submit coalescing and idempotency keys."""
