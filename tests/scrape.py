"""Reading a real process's Prometheus endpoint in tests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample served at ``http://address/metrics``, keyed by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def eventually(
    read: Callable[[], Samples], check: Callable[[Samples], bool], timeout: float = 15.0
) -> Samples:
    """Scrape until ``check`` holds (metrics read at scrape time may lag a call), or return
    the last scrape after ``timeout`` for the test's assertions to explain."""
    deadline = time.monotonic() + timeout
    while True:
        samples = read()
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)
