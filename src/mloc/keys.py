"""Every Redis key, stream, channel and consumer-group name MLOC uses, and nothing else.

All keys share the ``mloc:`` prefix so a shared Redis can host MLOC beside other tenants. The
transition script touches a task's keys, its worker's keys and global indexes at once, so MLOC needs
a single Redis (with Sentinel for failover), not a sharded Cluster; docs/deployment.md says more.
"""

from __future__ import annotations

PREFIX = "mloc"

# Tasks
TASKS_ALL = f"{PREFIX}:tasks"  # zset: task id -> created_at ms
# Zset: the ids in TASKS_ALL of tasks that are part of another (a dataset task's chunks, a replica group's
# shards), so a listing can leave them out without reading their records.
TASKS_CHILDREN = f"{PREFIX}:tasks:children"
PENDING = f"{PREFIX}:pending"  # zset: task id -> placement order (priority, then FIFO)
# String: the last queue order (ms) a new task took; every orchestrator's next task takes a later one.
QUEUE_ORDER = f"{PREFIX}:order"
TASKS_BY_NAME_PREFIX = f"{PREFIX}:tasks:name"
# Retries waiting out their backoff: task id -> unix seconds when it may be placed again. They join
# PENDING (and their owner's queue) only then.
RETRY_WAIT = f"{PREFIX}:pending:retry"
PENDING_OWNERS = f"{PREFIX}:pending:owners"  # set of owners with a task in their pending queue
# Replica groups: parents not yet settled (swept by the reaper), and parents one of whose shards
# started or ended since the orchestrator last looked (the transition script adds them).
GROUPS_OPEN = f"{PREFIX}:groups:open"  # set of parent task ids
GROUPS_TO_SETTLE = f"{PREFIX}:groups:settle"  # set of parent task ids


# Dependencies: tasks that wait for others (stored pending, out of every queue until released), and
# tasks with dependents that ended since the orchestrator last looked (the transition script adds them).
DEPS_WAITING = f"{PREFIX}:deps:waiting"  # set of task ids
# Stream of the tasks retention removed ({task}), capped: the processes that keep result folders read it
# and remove theirs (mloc.removals).
TASKS_REMOVED = f"{PREFIX}:tasks:removed"
# String: the last entry of TASKS_REMOVED whose task's copy in the artifact store is gone (mloc.removals).
TASKS_REMOVED_STORE_POSITION = f"{TASKS_REMOVED}:store-position"
DEPS_ENDED = f"{PREFIX}:deps:ended"  # set of task ids


def idempotency(owner: str, key_digest: str) -> str:
    """Hash: one owner's submit under one Idempotency-Key ({digest, ids, at, answer}), kept for
    MLOC_IDEMPOTENCY_TTL_SEC. ``key_digest`` is the key's SHA-256: a client's key may hold any character."""
    return f"{PREFIX}:idempotency:{owner}:{key_digest}"


def dependents(task_id: str) -> str:
    """Set: the tasks that wait for this one to succeed."""
    return f"{PREFIX}:task:{task_id}:dependents"


def pipeline(pipeline_id: str) -> str:
    """String: a pipeline's graph as JSON ({"id", "owner", "created_at", "tasks": [{"name", "task_id",
    "depends_on"}]}), written with its tasks."""
    return f"{PREFIX}:pipeline:{pipeline_id}"


PIPELINES = f"{PREFIX}:pipelines"  # zset: pipeline id -> created_at (s), for short-id lookups


def pipelines_of_owner(owner: str) -> str:
    """Zset of one owner's pipeline ids (created_at s)."""
    return f"{PREFIX}:pipelines:owner:{owner}"


def group_lock(parent_id: str) -> str:
    """String: held by the orchestrator settling or resuming a chunked dataset task (it cuts chunks)."""
    return f"{PREFIX}:groups:lock:{parent_id}"


def pending_of(owner: str) -> str:
    """Zset: one owner's placeable pending tasks, scored like PENDING (the scheduler shares between them)."""
    return f"{PREFIX}:pending:owner:{owner}"


def task(task_id: str) -> str:
    """Hash with the task record."""
    return f"{PREFIX}:task:{task_id}"


def task_result(task_id: str) -> str:
    """String with the task's result JSON (kept apart from the record: it can be large)."""
    return f"{PREFIX}:task:{task_id}:result"


def task_logs(task_id: str) -> str:
    """Stream of the task's log lines and events."""
    return f"{PREFIX}:task:{task_id}:logs"


def task_metrics(task_id: str) -> str:
    """List of the task's per-step metrics (JSON objects), oldest first."""
    return f"{PREFIX}:task:{task_id}:metrics"


def tasks_in_state(state: str) -> str:
    """Zset of task ids in one state (created_at ms), so listing by state is cheap."""
    return f"{PREFIX}:tasks:state:{state}"


def tasks_of_owner(owner: str) -> str:
    """Zset of one owner's task ids (created_at ms)."""
    return f"{PREFIX}:tasks:owner:{owner}"


def children_of_owner(owner: str) -> str:
    """Zset: the ids in :func:`tasks_of_owner` that are part of another task (see TASKS_CHILDREN)."""
    return f"{PREFIX}:tasks:children:owner:{owner}"


# Workers
WORKERS = f"{PREFIX}:workers"  # zset: worker id -> last heartbeat (unix seconds)


def worker(worker_id: str) -> str:
    """Hash with the worker's registration and capacity counters."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_free_gpus(worker_id: str) -> str:
    """Set of the GPU indices on a worker that no task holds."""
    return f"{PREFIX}:worker:{worker_id}:gpus_free"


def worker_tasks(worker_id: str) -> str:
    """Set of task ids assigned to or running on a worker."""
    return f"{PREFIX}:worker:{worker_id}:tasks"


def worker_stream(worker_id: str) -> str:
    """Stream of assignments for one worker."""
    return f"{PREFIX}:stream:worker:{worker_id}"


WORKER_GROUP = "workers"  # consumer group on every worker stream

# Orchestrators (mloc.orchestrators): the ids of those that announced themselves, each with a record
# that expires unless its orchestrator keeps writing it.
ORCHESTRATORS = f"{PREFIX}:orchestrators"  # zset: orchestrator id -> started_at (unix seconds)


def orchestrator(orchestrator_id: str) -> str:
    """String: a running orchestrator's presence record (JSON: where it runs, since when, its fleet-wide
    settings), with an expiry it renews while it runs."""
    return f"{PREFIX}:orchestrator:{orchestrator_id}"


# Signals
SCHEDULER_WAKE = f"{PREFIX}:chan:scheduler"  # pub/sub: capacity freed or work arrived
# String: the backfill hold, JSON (mloc.orchestrator.shadow.Hold): the worker kept for one waiting
# task and when it can start there; written as passes choose it, with a TTL (mloc.orchestrator.backfill).
BACKFILL_HOLD = f"{PREFIX}:backfill:hold"
CONTROL_CHANNEL_PREFIX = f"{PREFIX}:chan:worker"
EVENTS = f"{PREFIX}:events"  # stream of task state changes (capped)
# Hash: "<state>:<task type>" -> how many times a task entered that end state (succeeded, failed,
# cancelled), counted by the transition script whichever process made the move; only ever incremented,
# never expired, so /metrics exports it as a counter that outlives every process.
TASK_OUTCOMES = f"{PREFIX}:outcomes"
SCHEDULER_LOCK = f"{PREFIX}:lock:scheduler"
REAPER_LOCK = f"{PREFIX}:lock:reaper"


def worker_control(worker_id: str) -> str:
    """Pub/sub channel for commands to one worker (cancel a running task)."""
    return f"{CONTROL_CHANNEL_PREFIX}:{worker_id}"


# Memory fit at admission (mloc.orchestrator.admission, mloc.memoryhistory)
def model_facts(model: str) -> str:
    """String: a model's facts (JSON) as the orchestrator read them from the hub or a URL, kept a day."""
    return f"{PREFIX}:modelfacts:{model}"


def memory_ratio(model: str, kind: str) -> str:
    """String: the last measured peak against its estimate (JSON) for one model and task kind."""
    return f"{PREFIX}:memfit:ratio:{model}|{kind}"


# Usage and users
def usage_day(owner: str, day: str) -> str:
    """Hash of usage counters for one owner on one UTC day (YYYY-MM-DD)."""
    return f"{PREFIX}:usage:{owner}:{day}"


USAGE_OWNERS = f"{PREFIX}:usage:owners"  # set of owners with recorded usage


def usage_days(owner: str) -> str:
    """Zset: the UTC days (YYYY-MM-DD) on which one owner has usage, scored by day number (days since
    1970-01-01), so a report over years reads only the days that have any."""
    return f"{PREFIX}:usage-days:{owner}"


# String, set once the day indexes hold every usage hash written before they existed.
USAGE_DAYS_BUILT = f"{PREFIX}:usage:days-indexed"


def owner_and_day(usage_key: str) -> tuple[str, str] | None:
    """The (owner, day) of a :func:`usage_day` key, or None for any other key."""
    head = f"{PREFIX}:usage:"
    if not usage_key.startswith(head):
        return None
    owner, _, day = usage_key[len(head) :].rpartition(":")
    if not owner or len(day) != 10 or day[4] != "-" or day[7] != "-" or not day.replace("-", "").isdigit():
        return None
    return owner, day


def user_token(token_hash: str) -> str:
    """String: user name for a hashed API token."""
    return f"{PREFIX}:user:token:{token_hash}"


USERS = f"{PREFIX}:users"  # hash: user name -> JSON record


def user_usage(name: str) -> str:
    """Hash: what one task owner holds now (tasks assigned or running, GPUs), kept by the transition script."""
    return f"{PREFIX}:user:{name}:usage"


def user_quota(name: str) -> str:
    """Hash: one user's own limits (tasks, gpus); a missing field means the settings' default."""
    return f"{PREFIX}:user:{name}:quota"


def user_budget(name: str) -> str:
    """Hash: one user's budgets, field "<metric>/<period>" (a GPU model after a colon in the metric:
    "gpu_time:A100/month") -> JSON {"limit", "hard"}; see mloc.orchestrator.budgets."""
    return f"{PREFIX}:user:{name}:budget"


def user_fair_share(name: str) -> str:
    """Hash: one task owner's fair-share standing: ``cost`` and ``count`` (finished work decayed with
    the half-life, kept by the transition script), ``at`` (unix seconds they were decayed to) and
    ``weight`` (set by the admin; missing = 1)."""
    return f"{PREFIX}:user:{name}:share"


def usage_month(owner: str, month: str) -> str:
    """Hash: one owner's budget counters (tokens, GPU- and CPU-seconds) in one UTC month (YYYY-MM),
    added with the day's by the transition script, so a monthly budget costs one read."""
    return f"{PREFIX}:usage-month:{owner}:{month}"


BUDGETS_HARD = f"{PREFIX}:budgets:hard"  # set: users with a hard budget (their running tasks may be stopped)
# String: the fair-share half-life in seconds the orchestrator runs with, read by the transition
# script, so every process that ends a task decays usage alike (missing: the settings' default).
FAIR_SHARE_HALF_LIFE = f"{PREFIX}:fair-share:half-life"


# The OpenAI Batch API (mloc.openai_files, mloc.api.openai_batch)
def openai_file(file_id: str) -> str:
    """Hash: an uploaded file's metadata (id, bytes, created_at, filename, purpose, owner)."""
    return f"{PREFIX}:openai:file:{file_id}"


def openai_files_of(owner: str) -> str:
    """Zset: the ids of one owner's uploads, scored by upload time (ms), for GET /v1/files."""
    return f"{PREFIX}:openai:files:{owner}"


# Set once the uploads stored before the owner indexes existed have been put in them.
OPENAI_FILES_INDEXED = f"{PREFIX}:openai:files-indexed"


def openai_batches(owner: str) -> str:
    """Zset: the task ids of one owner's batches (created_at ms), for GET /v1/batches."""
    return f"{PREFIX}:openai:batches:{owner}"


def openai_failed_batch(task_id: str) -> str:
    """Hash: a batch whose input file failed validation, so no task runs it: its owner and its Batch object
    (JSON), under the task id its batch id holds."""
    return f"{PREFIX}:openai:failed-batch:{task_id}"


def openai_batch_ends(owner: str) -> str:
    """Hash: the task ids of one owner's batches that may end (again: a failed or cancelled one may be
    resumed) -> the end their output and error files were last listed at ("" before their first), for
    GET /v1/files."""
    return f"{PREFIX}:openai:batch-ends:{owner}"


# Set of the owners whose batches made before openai_batch_ends existed have been put in it.
OPENAI_OUTPUTS_INDEXED = f"{PREFIX}:openai:outputs-indexed"
