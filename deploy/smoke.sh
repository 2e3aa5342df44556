#!/bin/bash
# The deployment path, for real (run by hand, not in CI): build the image, start the compose
# stack (PostgreSQL, migrate, 3 hashd, the balancer, 2 workerd), hash through the balancer,
# run a task to the end, scale hashd to 5 and back to 3 (the balancer follows each time),
# check every container's health, tear everything down. Exits non-zero at the first failure.
#
#   deploy/smoke.sh
#   BASE_IMAGE=python:3.11-slim POSTGRES_IMAGE=hashmesh-smoke/postgres:15 deploy/smoke.sh
#
# Without a registry, make the base images first: deploy/smoke-base.sh (as root).
# Settings: BASE_IMAGE (the Dockerfile's base), POSTGRES_IMAGE, HASHMESH_IMAGE (the tag to
# build), PROJECT (compose project name), BALANCER_PORT / BALANCER_ADMIN_PORT (host ports,
# default free ones), COMPOSE (the compose command; default: `docker compose` (v2), else
# `docker-compose` (v1), else `podman-compose`). Prometheus and Grafana are not started (their
# images come from a registry); everything else in docker-compose.yml is.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
export POSTGRES_IMAGE=${POSTGRES_IMAGE:-postgres:17-alpine}
export HASHMESH_IMAGE=${HASHMESH_IMAGE:-hashmesh:0.1.0}
export HASHMESH_ADMIN_TOKEN=${HASHMESH_ADMIN_TOKEN:-smoke-admin-token}
PROJECT=${PROJECT:-hashmesh-smoke}
SERVICES=(postgres migrate hashd balancer workerd)

say() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export BALANCER_PORT=${BALANCER_PORT:-$(free_port)}
export BALANCER_ADMIN_PORT=${BALANCER_ADMIN_PORT:-$(free_port)}

if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose_cmd <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose_cmd=(docker-compose)
elif command -v podman-compose >/dev/null; then
    compose_cmd=(podman-compose)
else
    fail "no compose: install Docker Compose v2, docker-compose or podman-compose"
fi
if [ "${compose_cmd[0]}" = podman-compose ]; then ENGINE=podman; else ENGINE=docker; fi
compose() { "${compose_cmd[@]}" -p "$PROJECT" -f docker-compose.yml "$@"; }
say "engine: $($ENGINE --version); compose: $("${compose_cmd[@]}" version 2>/dev/null | head -1)"

teardown() {
    say "tear down"
    compose down -v --remove-orphans >/dev/null 2>&1 || true
}
trap teardown EXIT

# --- build --------------------------------------------------------------------------------
say "build $HASHMESH_IMAGE from $BASE_IMAGE"
build_args=(-f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$HASHMESH_IMAGE")
[ "$ENGINE" = podman ] && build_args+=(--format docker)  # keep the HEALTHCHECK
started=$(date +%s)
"$ENGINE" build -q "${build_args[@]}" . >/dev/null
say "built in $(( $(date +%s) - started ))s: $($ENGINE image inspect -f '{{.Size}}' "$HASHMESH_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
if "$ENGINE" run --rm --entrypoint python "$HASHMESH_IMAGE" -c 'import pgserver' >/dev/null 2>&1; then
    fail "the runtime image carries pgserver"
fi
say "the runtime image has no embedded PostgreSQL (pgserver absent)"

# --- up -----------------------------------------------------------------------------------
say "compose up: ${SERVICES[*]} (host ports $BALANCER_PORT, $BALANCER_ADMIN_PORT)"
compose up -d --no-build "${SERVICES[@]}" >/dev/null 2>&1 || { compose logs --tail 20; fail "compose up"; }

ps_all=()
[ "${compose_cmd[*]}" = "docker compose" ] && ps_all=(-a)  # v2 lists only running ones otherwise
containers() { compose ps "${ps_all[@]}" -q "$@" 2>/dev/null; }
health() { "$ENGINE" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1"; }
name_of() { "$ENGINE" inspect -f '{{.Name}}' "$1" | sed 's|^/||'; }
wait_healthy() {  # SERVICE COUNT: COUNT containers of SERVICE, all healthy
    local service=$1 count=$2 deadline=$(( $(date +%s) + 180 )) ids healthy
    while :; do
        ids=$(containers "$service")
        healthy=0
        for id in $ids; do [ "$(health "$id")" = healthy ] && healthy=$((healthy + 1)); done
        [ "$(wc -w <<<"$ids")" -eq "$count" ] && [ "$healthy" -eq "$count" ] && return 0
        [ "$(date +%s)" -lt "$deadline" ] || { compose ps; fail "$service: $healthy of $count healthy"; }
        sleep 2
    done
}
balancer_exec() { "$ENGINE" exec "$(containers balancer)" "$@"; }
hashctl() { balancer_exec hashctl --target 127.0.0.1:50050 --admin-target 127.0.0.1:50060 "$@"; }
wait_backends() {  # COUNT: the balancer lists COUNT replicas, all READY
    local count=$1 deadline=$(( $(date +%s) + 120 )) listed
    while :; do
        listed=$(hashctl --json lb backends 2>/dev/null || true)
        if python3 -c 'import json,sys; b=json.loads(sys.argv[1])["backends"]; n=int(sys.argv[2]); sys.exit(not (len(b)==n and all(x["state"]=="ready" for x in b)))' "$listed" "$count" 2>/dev/null; then
            return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] || fail "the balancer does not list $count ready replicas: $listed"
        sleep 2
    done
}

wait_healthy postgres 1
wait_healthy hashd 3
wait_healthy balancer 1
wait_healthy workerd 2
[ "$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$(containers migrate)")" = 0 ] || fail "migrate did not exit 0"
say "up: postgres, 3 hashd, balancer, 2 workerd healthy; migrate exited 0"
for id in $(containers hashd); do
    limit=$("$ENGINE" inspect -f '{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}' "$id")
    say "  $(name_of "$id"): memory limit $(awk '{print $1/1048576}' <<<"$limit") MiB, cpus $(awk '{print $2/1e9}' <<<"$limit")"
done
wait_backends 3

# --- use it -------------------------------------------------------------------------------
expected=2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
got=$(hashctl hash sha256 hello)
[ "$got" = "$expected" ] || fail "hashctl hash sha256 hello printed $got"
say "hashctl hash sha256 hello -> $got"
got=$(hashctl submit md5 hello --wait --wait-timeout 60)
[ "$got" = 5d41402abc4b2a76b9719d911017c592 ] || fail "submit --wait printed $got"
say "hashctl submit md5 hello --wait -> $got (run by a workerd)"
# argon2 sized by the container's limits: hashd reads them from its cgroup, and two calls at
# the largest memory_cost it accepts, at once, do not get it OOM-killed.
hashd_one=$(containers hashd | head -1)
say "hashd's view of its container: $("$ENGINE" exec "$hashd_one" python -c '
from hashmesh.hashd.config import HashdSettings
s = HashdSettings.from_env()
r = s.resources
print(f"{r.cpus:g} CPU, {r.memory_bytes >> 20} MiB (limited: {r.limited}); "
      f"argon2 threads {s.cpu_workers}, largest memory_cost {s.argon2_memory_limit_kib} KiB")')"
for i in 1 2; do  # both on one replica: its one argon2 thread runs them in turn
    "$ENGINE" exec "$hashd_one" hashctl --target 127.0.0.1:50051 hash argon2id "pw$i" \
        --memory-cost 262144 --time-cost 1 >/dev/null &
done
wait || fail "a 256 MiB argon2 call failed"
for id in $(containers hashd); do
    [ "$("$ENGINE" inspect -f '{{.State.OOMKilled}} {{.RestartCount}}' "$id")" = "false 0" ] \
        || fail "$(name_of "$id") was OOM-killed or restarted"
done
say "two argon2id calls of 256 MiB at once: answered, no hashd OOM-killed or restarted"

# --- scale up and down --------------------------------------------------------------------
say "scale hashd to 5"
compose up -d --no-build --no-deps --scale hashd=5 hashd >/dev/null 2>&1 || fail "scale up"
wait_healthy hashd 5
wait_backends 5
for _ in $(seq 1 20); do hashctl hash md5 spread >/dev/null; done
picked=$(hashctl --json lb stats | python3 -c 'import json,sys; print(sum(1 for b in json.load(sys.stdin)["backends"] if b["calls"] > 0))')
say "5 hashd healthy, the balancer has 5 ready; $picked of 5 took calls"
say "scale hashd back to 3"
compose up -d --no-build --no-deps --scale hashd=3 hashd >/dev/null 2>&1 || fail "scale down"
wait_healthy hashd 3
wait_backends 3
for _ in $(seq 1 10); do hashctl hash md5 after >/dev/null || fail "a call failed after the scale-down"; done
say "3 hashd, the balancer follows; calls go on"

# --- every container's health ---------------------------------------------------------------
bad=0
for service in postgres hashd balancer workerd; do
    for id in $(containers "$service"); do
        state=$(health "$id")
        say "  $(name_of "$id"): $state"
        [ "$state" = healthy ] || bad=1
    done
done
say "  $(name_of "$(containers migrate)"): exited $("$ENGINE" inspect -f '{{.State.ExitCode}}' "$(containers migrate)")"
[ "$bad" = 0 ] || fail "a container is not healthy"
say "PASS"
