"""The pool collector against a real PostgreSQL: connections, requests and errors of a live
psycopg pool show up on /metrics."""

from __future__ import annotations

import asyncio
import urllib.request

import psycopg_pool
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hashmesh.core import metrics


def pool_samples(endpoint: metrics.MetricsServer, pool: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.labels.get("pool") == pool
    }


def test_pool_collector_reads_a_live_pool(dsn: str) -> None:
    endpoint = metrics.start_metrics_server(0, host="127.0.0.1")

    async def scenario() -> tuple[dict[str, float], dict[str, float]]:
        pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=1, max_size=2, timeout=3.0, open=False, name="itest"
        )
        metrics.watch_pool(pool)
        try:
            await pool.open(wait=True)
            for _ in range(5):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            busy = [await pool.getconn() for _ in range(2)]
            with pytest.raises(psycopg_pool.PoolTimeout):
                await pool.getconn()  # the pool is exhausted: a request error
            during = await asyncio.to_thread(pool_samples, endpoint, "itest")
            for conn in busy:
                await pool.putconn(conn)
            after = await asyncio.to_thread(pool_samples, endpoint, "itest")
            return during, after
        finally:
            await pool.close()
            metrics.unwatch_pool(pool)

    try:
        during, after = asyncio.run(scenario())
    finally:
        endpoint.close()
    assert during["hashmesh_db_pool_max_connections"] == 2
    assert during["hashmesh_db_pool_connections"] == 2
    assert during["hashmesh_db_pool_idle_connections"] == 0
    assert during["hashmesh_db_pool_requests_total"] >= 8
    assert during["hashmesh_db_pool_request_errors_total"] == 1
    assert after["hashmesh_db_pool_idle_connections"] == 2
