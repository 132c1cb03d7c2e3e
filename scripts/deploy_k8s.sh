#!/usr/bin/env bash
# Deploys MLOC to Kubernetes (namespace mloc) from deploy/k8s/overlays/<OVERLAY>.
#
#   ./scripts/deploy_k8s.sh              # overlay cpu-dev: 1 orchestrator, 1 CPU worker, Redis
#   ./scripts/deploy_k8s.sh gpu          # 2 orchestrators, A100 + H100 worker pools, a CPU worker
#   ./scripts/deploy_k8s.sh --render gpu # print the manifests; touches no cluster
#
# Steps: checks kubectl; creates the namespace; creates the Secrets mloc-redis (password, url) and
# mloc-auth (orchestrator-token) unless they exist, with random values (openssl rand -hex 32) where
# none are given; kubectl apply -k; waits for Redis and the orchestrator to roll out.
# Options: --render     print the rendered manifests and stop
#          --no-wait    do not wait for the rollouts
# Env:     ORCHESTRATOR_TOKEN  admin token to store (default: keep the Secret's, else generate)
#          REDIS_PASSWORD      Redis password to store (default: keep the Secret's, else generate)
#          REDIS_URL           MLOC's Redis URL (default: redis://:<password>@redis:6379/0, the
#                              in-cluster Redis; give rediss://... for an external one)
#          MLOC_REGISTRY, MLOC_TAG  image registry prefix and tag (default: the overlay's)
#          KUBECTL (default: kubectl), ROLLOUT_TIMEOUT (default: 10m)
# Changing a Secret later: kubectl -n mloc rollout restart statefulset/redis deployment
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "deploy_k8s.sh: $*" >&2; exit 2; }

NAMESPACE=mloc
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KUBECTL="${KUBECTL:-kubectl}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-10m}"
RENDER=0
WAIT=1
OVERLAY=""

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --render) RENDER=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) [[ -z "$OVERLAY" ]] || die "one overlay only (got '$OVERLAY' and '$1')"; OVERLAY="$1"; shift ;;
  esac
done
OVERLAY="${OVERLAY:-cpu-dev}"
OVERLAYS_DIR="$ROOT/deploy/k8s/overlays"
[[ "$OVERLAY" =~ ^[A-Za-z0-9_.-]+$ && -f "$OVERLAYS_DIR/$OVERLAY/kustomization.yaml" ]] \
  || die "no overlay '$OVERLAY' (have: $(cd "$OVERLAYS_DIR" && printf '%s ' */ | tr -d /))"

command -v "$KUBECTL" >/dev/null 2>&1 \
  || die "'$KUBECTL' not found: install kubectl (>= 1.27, for kustomize labels) or set KUBECTL"

TMP_FILES=()
cleanup() { if [[ ${#TMP_FILES[@]} -gt 0 ]]; then rm -rf "${TMP_FILES[@]}"; fi; }
trap cleanup EXIT

# The kustomization to apply: the overlay itself, or a throw-away one beside it that re-tags the
# images (kustomize accepts only relative paths to other kustomizations).
KUSTOMIZATION="$OVERLAYS_DIR/$OVERLAY"
if [[ -n "${MLOC_REGISTRY:-}" || -n "${MLOC_TAG:-}" ]]; then
  prefix="${MLOC_REGISTRY:-}"
  if [[ -n "$prefix" && "$prefix" != */ ]]; then prefix="$prefix/"; fi
  KUSTOMIZATION="$(mktemp -d "$OVERLAYS_DIR/.render-$OVERLAY.XXXXXX")"
  TMP_FILES+=("$KUSTOMIZATION")
  {
    echo "apiVersion: kustomize.config.k8s.io/v1beta1"
    echo "kind: Kustomization"
    echo "resources:"
    echo "  - ../$OVERLAY"
    echo "images:"
    for image in mloc-orchestrator mloc-worker mloc-worker-cpu; do
      echo "  - name: $image"
      if [[ -n "$prefix" ]]; then echo "    newName: \"$prefix$image\""; fi
      if [[ -n "${MLOC_TAG:-}" ]]; then echo "    newTag: \"$MLOC_TAG\""; fi
    done
  } > "$KUSTOMIZATION/kustomization.yaml"
fi

if [[ $RENDER -eq 1 ]]; then
  "$KUBECTL" kustomize "$KUSTOMIZATION"
  exit 0
fi

"$KUBECTL" version --request-timeout=15s >/dev/null \
  || die "cannot reach the cluster of the current kubectl context ($("$KUBECTL" config current-context 2>/dev/null || echo none))"

echo "==> namespace $NAMESPACE" >&2
"$KUBECTL" create namespace "$NAMESPACE" --dry-run=client -o yaml | "$KUBECTL" apply -f -

# secret_value SECRET KEY: the value stored in the cluster, or nothing.
secret_value() {
  local encoded
  encoded="$("$KUBECTL" -n "$NAMESPACE" get secret "$1" -o "jsonpath={.data.$2}" 2>/dev/null || true)"
  if [[ -n "$encoded" ]]; then printf '%s' "$encoded" | base64 -d; fi
}

random_secret() {
  command -v openssl >/dev/null 2>&1 || die "openssl not found: set REDIS_PASSWORD and ORCHESTRATOR_TOKEN"
  openssl rand -hex 32
}

# apply_secret NAME KEY=VALUE...: values go through a private temporary file, never argv.
apply_secret() {
  local name="$1" env_file
  shift
  env_file="$(umask 077 && mktemp)"
  TMP_FILES+=("$env_file")
  printf '%s\n' "$@" > "$env_file"
  "$KUBECTL" -n "$NAMESPACE" create secret generic "$name" --from-env-file="$env_file" \
    --dry-run=client -o yaml | "$KUBECTL" apply -f -
  rm -f "$env_file"
}

existing_password="$(secret_value mloc-redis password)"
existing_url="$(secret_value mloc-redis url)"
if [[ -n "${REDIS_PASSWORD:-}" || -n "${REDIS_URL:-}" || -z "$existing_password" || -z "$existing_url" ]]; then
  password="${REDIS_PASSWORD:-${existing_password:-$(random_secret)}}"
  [[ "$password" =~ ^[A-Za-z0-9._~-]+$ ]] \
    || die "REDIS_PASSWORD may hold only A-Z a-z 0-9 . _ ~ - (it goes into a URL unescaped)"
  url="${REDIS_URL:-redis://:$password@redis.$NAMESPACE.svc:6379/0}"
  echo "==> secret mloc-redis (password, url)" >&2
  apply_secret mloc-redis "password=$password" "url=$url"
else
  echo "==> secret mloc-redis exists: kept" >&2
fi

existing_token="$(secret_value mloc-auth orchestrator-token)"
if [[ -n "${ORCHESTRATOR_TOKEN:-}" || -z "$existing_token" ]]; then
  token="${ORCHESTRATOR_TOKEN:-$(random_secret)}"
  echo "==> secret mloc-auth (orchestrator-token)" >&2
  apply_secret mloc-auth "orchestrator-token=$token"
else
  echo "==> secret mloc-auth exists: kept" >&2
fi

echo "==> kubectl apply -k deploy/k8s/overlays/$OVERLAY" >&2
"$KUBECTL" apply -k "$KUSTOMIZATION"

if [[ $WAIT -eq 1 ]]; then
  echo "==> waiting for Redis and the orchestrator (timeout $ROLLOUT_TIMEOUT)" >&2
  "$KUBECTL" -n "$NAMESPACE" rollout status statefulset/redis --timeout="$ROLLOUT_TIMEOUT"
  "$KUBECTL" -n "$NAMESPACE" rollout status deployment/orchestrator --timeout="$ROLLOUT_TIMEOUT"
  # Workers wait for nodes with their GPU model: report them, do not fail the deploy on them.
  for worker in $("$KUBECTL" -n "$NAMESPACE" get deployments -l app.kubernetes.io/component=worker -o name); do
    "$KUBECTL" -n "$NAMESPACE" rollout status "$worker" --timeout=60s \
      || echo "warning: $worker is not ready yet (no node with its GPU model? kubectl -n $NAMESPACE describe $worker)" >&2
  done
  "$KUBECTL" -n "$NAMESPACE" get pods -o wide
fi

cat <<MSG

MLOC is deployed in namespace $NAMESPACE (overlay $OVERLAY). Reach the API with:
  kubectl port-forward service/orchestrator 8000:8000 -n $NAMESPACE
  curl http://localhost:8000/health
Admin token:
  kubectl -n $NAMESPACE get secret mloc-auth -o jsonpath='{.data.orchestrator-token}' | base64 -d
MSG
