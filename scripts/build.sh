#!/usr/bin/env bash
# Builds the MLOC images (BuildKit), tags them and optionally pushes them.
#
#   ./scripts/build.sh                       # all three images, tagged <version> and latest
#   ./scripts/build.sh orchestrator worker-cpu
#   MLOC_REGISTRY=registry.example.com/team ./scripts/build.sh --push
#
# Images:  orchestrator -> mloc-orchestrator  (docker/Dockerfile.orchestrator, no torch)
#          worker       -> mloc-worker        (docker/Dockerfile.worker, CUDA + vLLM)
#          worker-cpu   -> mloc-worker-cpu    (docker/Dockerfile.worker-cpu)
# Options: --tag TAG        image tag (default: MLOC_TAG, else the version in pyproject.toml)
#          --registry REG   prefix REG/ to the names (default: MLOC_REGISTRY)
#          --push           push <REG/>name:TAG and <REG/>name:latest (needs a registry)
#          --no-latest      do not also tag :latest
#          --build-arg K=V  passed to docker build (repeatable), e.g. VLLM_VERSION=0.32.0
#          --dry-run        print the docker commands instead of running them
# Env:     DOCKER (default: docker), MLOC_TAG, MLOC_REGISTRY.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "build.sh: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER="${DOCKER:-docker}"
TAG="${MLOC_TAG:-}"
REGISTRY="${MLOC_REGISTRY:-}"
PUSH=0
LATEST=1
DRY_RUN=0
BUILD_ARGS=()
IMAGES=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --tag) [[ $# -ge 2 ]] || die "--tag needs a value"; TAG="$2"; shift 2 ;;
    --registry) [[ $# -ge 2 ]] || die "--registry needs a value"; REGISTRY="$2"; shift 2 ;;
    --push) PUSH=1; shift ;;
    --no-latest) LATEST=0; shift ;;
    --build-arg) [[ $# -ge 2 ]] || die "--build-arg needs K=V"; BUILD_ARGS+=(--build-arg "$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    orchestrator|worker|worker-cpu) IMAGES+=("$1"); shift ;;
    *) die "unknown argument '$1' (images: orchestrator, worker, worker-cpu; see --help)" ;;
  esac
done
[[ ${#IMAGES[@]} -gt 0 ]] || IMAGES=(orchestrator worker-cpu worker)

if [[ -z "$TAG" ]]; then
  TAG="$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n 1)"
  [[ -n "$TAG" ]] || die "no --tag given and no version found in pyproject.toml"
fi
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$TAG' is not a valid image tag"
if [[ -n "$REGISTRY" && "$REGISTRY" != */ ]]; then
  REGISTRY="$REGISTRY/"
fi
if [[ $PUSH -eq 1 && -z "$REGISTRY" ]]; then
  die "--push needs a registry (--registry REG or MLOC_REGISTRY)"
fi

run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if [[ $DRY_RUN -eq 0 ]] && ! command -v "$DOCKER" >/dev/null 2>&1; then
  die "'$DOCKER' not found: install Docker (with BuildKit) or set DOCKER"
fi
if [[ $DRY_RUN -eq 0 ]] && ! "$DOCKER" info >/dev/null 2>&1; then
  die "no Docker engine answers ('$DOCKER info' failed): start the Docker daemon, or use --dry-run to print the build commands"
fi
if [[ $DRY_RUN -eq 0 ]] && ! "$DOCKER" buildx version >/dev/null 2>&1; then
  die "the Docker buildx component (BuildKit) is missing: install docker-buildx, or use --dry-run to print the build commands"
fi
export DOCKER_BUILDKIT=1

cd "$ROOT"
for image in "${IMAGES[@]}"; do
  name="mloc-$image"
  dockerfile="docker/Dockerfile.$image"
  [[ -f "$dockerfile" ]] || die "$dockerfile is missing"
  tags=(-t "$REGISTRY$name:$TAG")
  if [[ $LATEST -eq 1 ]]; then
    tags+=(-t "$REGISTRY$name:latest")
  fi
  # Without a registry the names are exactly the seeds' (mloc-orchestrator, mloc-worker).
  echo "==> building $REGISTRY$name:$TAG from $dockerfile" >&2
  run "$DOCKER" build "${tags[@]}" ${BUILD_ARGS[@]+"${BUILD_ARGS[@]}"} -f "$dockerfile" .
  if [[ $PUSH -eq 1 ]]; then
    run "$DOCKER" push "$REGISTRY$name:$TAG"
    if [[ $LATEST -eq 1 ]]; then
      run "$DOCKER" push "$REGISTRY$name:latest"
    fi
  fi
done
echo "==> done: ${IMAGES[*]} tagged $TAG" >&2
