"""hashmesh balancer: a gRPC proxy in front of the hashd replicas.

Modules, one job each: ``config`` (settings), ``pickers`` (pure picking policies),
``backends`` (replica set: health checks, ejection, DNS, drain), ``ratelimit`` (per-peer
aiolimiter buckets), ``keys`` (client API keys, stored hashed), ``interceptors`` (the checks a
call passes, in the order written in ``build_chain``), ``proxy`` (forwarding raw bytes),
``admin`` (AdminService), ``stats`` (counters), ``server`` (wiring and lifecycle)."""
