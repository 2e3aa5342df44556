"""Code several hashmesh processes share. Two packages name the architecture: ``queue`` (the
durable task queue on PostgreSQL) and ``hashing`` (the algorithms, the result cache, wire
conversions). Beside them: settings, the error tree, the gRPC server frame, signals, TLS,
identity stamps, logging, metrics and the embedded PostgreSQL."""
