"""deploy/healthcheck.py finds the role it runs beside and where it listens (a fake /proc)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

PROBE = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


@pytest.fixture(scope="module")
def probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hashmesh_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _proc(root: Path, processes: dict[int, list[str]]) -> Path:
    for pid, argv in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    (root / "self").mkdir()
    return root


@pytest.mark.parametrize(
    ("argv", "role", "target"),
    [
        (["/opt/hashmesh/bin/python", "/opt/hashmesh/bin/hashd"], "hashd", "127.0.0.1:50051"),
        (
            [
                "/opt/hashmesh/bin/python",
                "/opt/hashmesh/bin/hashmesh-balancer",
                "--listen",
                "0.0.0.0:7000",
                "--admin-listen",
                "0.0.0.0:7001",
            ],
            "balancer",
            "127.0.0.1:7000",
        ),
        (["python", "-m", "hashmesh.hashd", "--listen=0.0.0.0:6001"], "hashd", "127.0.0.1:6001"),
        (["/opt/hashmesh/bin/python", "/opt/hashmesh/bin/workerd"], "workerd", None),
    ],
)
def test_each_role_is_found_with_its_port(
    probe: ModuleType,
    tmp_path: Path,
    argv: list[str],
    role: str,
    target: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HASHMESH_HASHD_LISTEN", raising=False)
    monkeypatch.delenv("HASHMESH_BALANCER_LISTEN", raising=False)
    root = _proc(
        tmp_path,
        {
            1: ["/sbin/docker-init", "--", *argv],
            7: argv,
            9: ["/opt/hashmesh/bin/python", "/opt/hashmesh/bin/hashmesh-healthcheck"],
        },
    )
    found = probe.find_daemon(root)
    assert found is not None and found[0] == role
    if target is not None:
        assert probe.target_of(role, found[1]) == target


def test_the_listen_variable_counts_and_a_one_shot_container_passes(
    probe: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HASHMESH_HASHD_LISTEN", "0.0.0.0:50999")
    assert probe.target_of("hashd", ["hashd"]) == "127.0.0.1:50999"
    root = _proc(
        tmp_path, {1: ["/opt/hashmesh/bin/python", "/opt/hashmesh/bin/hashctl", "db", "migrate"]}
    )
    assert probe.find_daemon(root) is None


def test_workerd_is_checked_through_the_metrics_port_of_its_environment(
    probe: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        monkeypatch.setenv("HASHMESH_WORKERD_METRICS_PORT", str(port))
        assert probe.check_workerd(["workerd"], 2.0) == 0
        assert probe.check_workerd(["workerd", "--metrics-port", str(port)], 2.0) == 0
        server.shutdown()
    assert probe.check_workerd(["workerd"], 2.0) == 1  # nobody answers any more
    monkeypatch.delenv("HASHMESH_WORKERD_METRICS_PORT")
    assert probe.check_workerd(["workerd"], 2.0) == 0  # no endpoint: alive is all there is
