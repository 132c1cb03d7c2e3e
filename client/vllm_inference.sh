#!/usr/bin/env bash
# Submit an inference task with curl and wait for its result, as the first seed shows.
#
#   cd client && ./vllm_inference.sh [TASK_FILE]
#
# TASK_FILE defaults to templates/inference_vllm_mistral.yaml (Mistral 7B on vLLM: a GPU worker
# with the model in its Hugging Face cache). On a CPU machine, pass
# ../templates/inference_gemma3_270m.yaml. Environment: MLOC_API_URL (default http://localhost:8000)
# and TOKEN or ORCHESTRATOR_TOKEN when the orchestrator requires a bearer token.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
task="${1:-$here/../templates/inference_vllm_mistral.yaml}"
api="${MLOC_API_URL:-http://localhost:8000}"
token="${TOKEN:-${ORCHESTRATOR_TOKEN:-}}"
auth=()
if [[ -n "$token" ]]; then
  auth=(-H "Authorization: Bearer $token")
fi

answer=$(curl -sS --fail-with-body -X POST "$api/api/v1/tasks" "${auth[@]}" \
  -H "Content-Type: text/yaml" --data-binary "@$task")
echo "$answer"
task_id=$(printf '%s' "$answer" | python3 -c 'import json, sys; print(json.load(sys.stdin)["task_id"])')

while true; do
  state=$(curl -sS --fail-with-body "${auth[@]}" "$api/api/v1/tasks/$task_id" \
    | python3 -c 'import json, sys; t = json.load(sys.stdin); print(t["state"], t.get("reason") or "")')
  case "$state" in
    succeeded*) break ;;
    failed*|cancelled*) echo "task $task_id: $state" >&2; exit 1 ;;
  esac
  sleep 1
done
curl -sS --fail-with-body "${auth[@]}" "$api/api/v1/tasks/$task_id/result"
echo
