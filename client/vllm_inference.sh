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

# Each change of state (and of why it waits) is printed. A task no registered worker can run waits
# for one to register: after WAIT_UNSCHEDULABLE_SEC (default 30) of that, the script says why and
# exits 1, leaving the task queued.
limit="${WAIT_UNSCHEDULABLE_SEC:-30}"
last="" since=""
while true; do
  read -r state unschedulable said < <(curl -sS --fail-with-body "${auth[@]}" "$api/api/v1/tasks/$task_id" \
    | python3 -c 'import json, sys; t = json.load(sys.stdin)
why = t.get("reason") if t["state"] in ("failed", "cancelled") else t.get("pending_reason")
print(t["state"], "yes" if t.get("unschedulable") else "no", (why or "").replace("\n", " "))')
  case "$state" in
    succeeded) break ;;
    failed|cancelled) echo "task $task_id: $state: $said" >&2; exit 1 ;;
  esac
  if [[ "$state $said" != "$last" ]]; then
    echo "task $task_id: $state${said:+: $said}" >&2
    last="$state $said"
  fi
  if [[ "$unschedulable" == yes ]]; then
    since="${since:-$SECONDS}"
    if (( SECONDS - since >= limit )); then
      echo "task $task_id cannot start: no registered worker can run it. It stays queued and starts if a" \
        "worker that fits registers; cancel it: curl -X POST $api/api/v1/tasks/$task_id/cancel" >&2
      exit 1
    fi
  else
    since=""
  fi
  sleep 1
done
curl -sS --fail-with-body "${auth[@]}" "$api/api/v1/tasks/$task_id/result"
echo
