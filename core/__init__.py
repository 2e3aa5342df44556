"""Code every hashmesh process shares: settings, errors, the gRPC server frame, PostgreSQL
access (pool, migrations, embedded server), hashing and telemetry."""
