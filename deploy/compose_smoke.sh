#!/usr/bin/env bash
# End-to-end check of docker-compose.yml on one machine: build both images, run `compose up` on a
# short embedded-default distillation, check that the trainer exits 0 and left its outputs in the
# `runs` volume, then `down -v`. Written for machines that reach Debian's mirror and PyPI but no
# container registry (DESIGN.md section 12): it installs docker.io + docker-compose if missing,
# starts dockerd if it is not running, and builds a local python:3.11-slim base image.
#
#   sudo deploy/compose_smoke.sh            # from anywhere; ~30-60 min the first time (torch), see deploy/README.md
#
# Environment (all optional):
#   SMOKE_MAX_STEPS=20          training steps of the short run (passed as RETNET_MAIN_ARGS="--max-steps N")
#   SMOKE_TIMEOUT=3600          seconds `compose up` may take before the smoke test fails
#   SMOKE_OUTPUT_DIR=/runs/main where the trainer writes (inside the trainer container)
#   SMOKE_EXPECT="..."          glob patterns under SMOKE_OUTPUT_DIR that must match a non-empty file
#   SMOKE_OVERRIDE=FILE         an extra compose file (-f), e.g. to try another trainer command
#   SMOKE_KEEP=1                keep containers and volumes afterwards (no `down -v`), to look inside
#   BASE_IMAGE_TOOL=PATH        builds python:3.11-slim when it is missing (default: ../shared/tools/local-python-base-image)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
max_steps=${SMOKE_MAX_STEPS:-20}
timeout_s=${SMOKE_TIMEOUT:-3600}
output_dir=${SMOKE_OUTPUT_DIR:-/runs/main}
expect=${SMOKE_EXPECT:-"**/report.json **/curves.png **/*.safetensors"}
base_tool=${BASE_IMAGE_TOOL:-$repo/../shared/tools/local-python-base-image}
project=retnetsmoke   # a fixed compose project name, so this never touches a user's own `docker compose up`

log() { printf '[compose_smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { log "FAILED: $*"; exit 1; }
timed() {  # timed LABEL CMD...: run CMD and log how long it took
  local label=$1 start=$SECONDS
  shift
  "$@"
  log "$label took $((SECONDS - start)) s"
}

# 1. Docker engine and Compose, from Debian when missing (dockerd 20.10, Compose 1.29).
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then missing+=(docker-compose); fi
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || fail "installing ${missing[*]} needs root"
  log "installing ${missing[*]} from Debian"
  timed "apt-get install" bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${missing[*]} >/dev/null"
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /tmp/dockerd.log); it keeps running after this script"
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not come up in 60 s; see /tmp/dockerd.log"
fi
if docker compose version >/dev/null 2>&1; then compose_cmd=(docker compose); else compose_cmd=(docker-compose); fi
log "using $("${compose_cmd[@]}" version 2>/dev/null | head -n1)"

# 2. Images. BuildKit needs buildx, which the docker CLI here lacks; unset, the CLI picks BuildKit
# where buildx exists and the classic builder elsewhere (no `# syntax=` line in our Dockerfiles).
unset DOCKER_BUILDKIT COMPOSE_DOCKER_CLI_BUILD
if ! docker image inspect python:3.11-slim >/dev/null 2>&1; then
  [[ -x $base_tool ]] || fail "python:3.11-slim is not here and no registry is assumed; set BASE_IMAGE_TOOL (not found: $base_tool)"
  timed "base image python:3.11-slim ($base_tool)" "$base_tool" python:3.11-slim
fi
# Built one after the other: the trainer reuses the teacher's dependency layer from the cache.
timed "build retnet-distill/teacher:local" docker build -f services/teacher.Dockerfile -t retnet-distill/teacher:local .
timed "build retnet-distill/trainer:local" docker build -f services/trainer.Dockerfile -t retnet-distill/trainer:local .
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^retnet-distill/' || true

# 3. compose up on a short run. Exported values override a .env file in the repo.
files=(-f docker-compose.yml)
[[ -n ${SMOKE_OVERRIDE:-} ]] && files+=(-f "$SMOKE_OVERRIDE")
compose() { "${compose_cmd[@]}" -p "$project" "${files[@]}" "$@"; }
export RETNET_MAIN_ARGS="--max-steps $max_steps"
export TEACHER_PUBLISH=127.0.0.1:   # a free host port: 8000 may be taken on a shared machine
cleanup() {
  if [[ -n ${SMOKE_KEEP:-} ]]; then log "SMOKE_KEEP set: left project $project up (remove: ${compose_cmd[*]} -p $project down -v)"; return; fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT
compose down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an interrupted run

log "compose up (short run: $RETNET_MAIN_ARGS; limit ${timeout_s} s)"
start=$SECONDS
set +e
timeout "$timeout_s" "${compose_cmd[@]}" -p "$project" "${files[@]}" up --no-build --exit-code-from trainer
rc=$?
set -e
log "compose up took $((SECONDS - start)) s; trainer exit code $rc"
if ((rc != 0)); then
  compose logs --tail=40 teacher || true
  ((rc == 124)) && fail "compose up ran past ${timeout_s} s"
  fail "the trainer exited with $rc"
fi

# 4. The outputs in the runs volume, read through the trainer image (same volumes, no teacher).
check='
import pathlib, sys
root, missing = pathlib.Path(sys.argv[1]), []
for pattern in sys.argv[2].split():
    found = sorted(f for f in root.glob(pattern) if f.is_file() and f.stat().st_size > 0)
    print(f"  {pattern}: " + (", ".join(f"{f} ({f.stat().st_size} bytes)" for f in found[:3]) or "MISSING"))
    missing += [] if found else [pattern]
sys.exit(f"missing under {root}: {missing}" if missing else 0)
'
log "outputs in $output_dir:"
compose run --rm --no-deps -T trainer python -c "$check" "$output_dir" "$expect" || fail "the trainer's outputs are incomplete"
log "PASSED: images built, trainer exited 0, outputs present ($expect)"
