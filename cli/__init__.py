"""hashctl, the primary client of hashmesh.

Modules, one job each: ``app`` (the command tree, global options, errors → exit codes),
``options`` (the global options and the flags several commands share), ``client`` (channels,
stubs, gRPC failure → message and exit code), ``output`` (JSON, tables, plain lines),
``naming`` (enum names both ways), ``state`` (what commands share), ``follow`` (waiting for a
task), ``hash_cmds`` / ``task_cmds`` / ``admin_cmds`` / ``key_cmds`` (the commands), with
``cache_stats`` (summing replicas' counters) and ``retention`` (``task prune``),
``supervisor`` + ``up`` + ``demo`` + ``state_lock`` (``hashctl up``), ``bench`` + ``bench_report``
(ghz-compatible load tests), ``locust_grpc`` (gRPC users for locust)."""
