"""Lua scripts, each headed by the KEYS and ARGV it takes. Key names come from :mod:`mloc.keys`:
scripts that must reach a key named by data they read (a task's worker) get a template with
``{id}`` in ARGV and fill it in, so no key string is written here. The transition script, the one
that changes a task's state, lives with its builder in :mod:`mloc.transition`."""

from __future__ import annotations

# HEARTBEAT: refresh a worker's liveness unless it was declared lost meanwhile.
# KEYS[1] worker hash   KEYS[2] workers zset
# ARGV[1] worker id     ARGV[2] now   ARGV[3] JSON of fields to set
# Returns "ok", or "lost" / "missing" when the worker must register again.
HEARTBEAT = r"""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'active' and status ~= 'draining' then return status end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], 'last_heartbeat', ARGV[2])
if ARGV[3] ~= '' then
  for name, value in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], name, value) end
end
return 'ok'
"""

# MARK_LOST: flip an active worker whose heartbeat is older than the cut-off to lost, once.
# KEYS[1] worker hash   KEYS[2] workers zset
# ARGV[1] worker id     ARGV[2] cut-off (unix seconds)   ARGV[3] now
# Returns 1 if this call marked it lost, 0 otherwise.
MARK_LOST = r"""
local status = redis.call('HGET', KEYS[1], 'status')
local seen = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '0')
if (status == 'active' or status == 'draining') and seen < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'lost', 'lost_at', ARGV[3])
  return 1
end
return 0
"""

# CREATE: store a new task, pending, with its indexes, at the next place in the queue order.
# KEYS[1] task hash   KEYS[2] all-tasks zset   KEYS[3] pending-state zset   KEYS[4] owner zset
# KEYS[5] pending queue zset  KEYS[6] the owner's pending queue  KEYS[7] set of owners with pending tasks
# KEYS[8] the last order given (every orchestrator's creates share it)
# KEYS[9] all part-of-another-task zset  KEYS[10] the owner's part-of-another-task zset
# ARGV[1] task id     ARGV[2] created ms       ARGV[3] the priority's part of the pending score,
# -priority x weight ("" = not for the scheduler)      ARGV[4] owner
# ARGV[5] "1": keep the created ms as the order (a chunk takes its parent's place)
# ARGV[6] "1": the task is part of another (a chunk or a shard), listed in KEYS[9] and KEYS[10] too
# ARGV[7..] field, value, ..., starting with created_ms (its value is replaced by the order given)
# Else the order is the created ms, or the one after the last given if that is not later: tasks of one
# priority queue in the order Redis stored them, whichever orchestrator (and clock) made them.
# Returns 1, or 0 if a task with that id exists.
CREATE = r"""
-- The new task in the pending queues (KEYS as CREATE takes them), at its priority's part of the score
-- plus its order.
local function queue_new(KEYS, id, owner, priority_part, order)
  -- Whole numbers below 2^53 add exactly, as Python's pending_score does.
  local score = string.format('%.17g', tonumber(priority_part) + order)
  redis.call('ZADD', KEYS[5], score, id)
  redis.call('ZADD', KEYS[6], score, id)
  redis.call('SADD', KEYS[7], owner)
end

-- Store the task (KEYS and ARGV as CREATE takes them); queue: list it as pending and put it in the
-- pending queues now (else its caller places it at once, or lists and queues it where it cannot).
-- Returns 1 and its order, or 0 when a task with its id exists.
local function create(KEYS, ARGV, queue)
  if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  local order = tonumber(ARGV[2])
  if ARGV[5] ~= '1' then
    order = math.max(order, tonumber(redis.call('GET', KEYS[8]) or '0') + 1)
    redis.call('SET', KEYS[8], string.format('%d', order))
  end
  local ms = string.format('%d', order)
  ARGV[8] = ms
  redis.call('HSET', KEYS[1], unpack(ARGV, 7))
  redis.call('ZADD', KEYS[2], ms, ARGV[1])
  if queue then redis.call('ZADD', KEYS[3], ms, ARGV[1]) end
  redis.call('ZADD', KEYS[4], ms, ARGV[1])
  if ARGV[6] == '1' then
    redis.call('ZADD', KEYS[9], ms, ARGV[1])
    redis.call('ZADD', KEYS[10], ms, ARGV[1])
  end
  if queue and ARGV[3] ~= '' then queue_new(KEYS, ARGV[1], ARGV[4], ARGV[3], order) end
  return 1, order
end
-- library end
return (create(KEYS, ARGV, true))
"""

# IDEMPOTENCY_CLAIM: claim an Idempotency-Key for a submit, or say what became of the earlier one.
# KEYS[1] the key's hash (mloc.keys.idempotency)
# ARGV[1] the request's digest   ARGV[2] the task ids this submit will create, as JSON   ARGV[3] now
# ARGV[4] how long the key is kept (seconds)   ARGV[5] how long a submit may take before another takes over
# Returns {"new"}: claimed; {"mismatch"}: the key was given with another request; {"done", answer};
# {"busy", at}: the first submit is still being stored; {"retake", ids}: the first submit stopped
# half way (its orchestrator died): this one takes over, with its ids.
IDEMPOTENCY_CLAIM = r"""
local m = redis.call('HMGET', KEYS[1], 'digest', 'ids', 'at', 'answer')
if not m[1] then
  redis.call('HSET', KEYS[1], 'digest', ARGV[1], 'ids', ARGV[2], 'at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'new'}
end
if m[1] ~= ARGV[1] then return {'mismatch'} end
if m[4] then return {'done', m[4]} end
if tonumber(ARGV[3]) - tonumber(m[3]) < tonumber(ARGV[5]) then return {'busy', m[3]} end
redis.call('HSET', KEYS[1], 'at', ARGV[3])
return {'retake', m[2]}
"""

# IDEMPOTENCY_SETTLE: keep a claimed submit's answer, or forget the claim of one that was refused.
# KEYS[1] the key's hash   ARGV[1] the claim's task ids as JSON (a claim taken over since is left alone)
# ARGV[2] the answer as JSON, or "": the submit was refused, and the key may be used again
# Returns 1, or 0 when the claim is no longer this one's.
IDEMPOTENCY_SETTLE = r"""
if redis.call('HGET', KEYS[1], 'ids') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('HSET', KEYS[1], 'answer', ARGV[2]) end
return 1
"""

# PROMOTE: move retries whose backoff has passed from the retry wait into the pending indexes.
# KEYS[1] retry-wait zset   KEYS[2] pending zset   KEYS[3] set of owners with pending tasks
# ARGV[1] now (unix seconds)   ARGV[2] template: task hash   ARGV[3] template: owner pending queue
# ARGV[4] most tasks to move
# Returns {moved, unix seconds of the next retry or ""}.
PROMOTE = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[4]))
local moved = 0
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local f = redis.call('HMGET', k(ARGV[2], id), 'state', 'retry_score', 'owner')
  if f[1] == 'pending' and f[2] and f[3] then
    redis.call('ZADD', KEYS[2], f[2], id)
    redis.call('ZADD', k(ARGV[3], f[3]), f[2], id)
    redis.call('SADD', KEYS[3], f[3])
    moved = moved + 1
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {moved, head[2] or ''}
"""

# RELEASE: a task whose dependencies all succeeded joins the pending queues (it was stored out of them).
# KEYS[1] task hash   KEYS[2] pending zset   KEYS[3] set of owners with pending tasks
# KEYS[4] set of waiting tasks   KEYS[5] scheduler wake channel
# ARGV[1] pending score   ARGV[2] template: owner pending queue   ARGV[3] pending reason
# Returns 1 when released, 0 when it was not waiting (released before, ended or gone).
RELEASE = r"""
local f = redis.call('HMGET', KEYS[1], 'state', 'waiting_on', 'owner', 'id')
if f[1] ~= 'pending' or not f[2] or f[2] == '' then return 0 end
redis.call('HDEL', KEYS[1], 'waiting_on')
redis.call('HSET', KEYS[1], 'pending_reason', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[1], f[4])
redis.call('ZADD', (string.gsub(ARGV[2], "{id}", f[3])), ARGV[1], f[4])
redis.call('SADD', KEYS[3], f[3])
redis.call('SREM', KEYS[4], f[4])
redis.call('PUBLISH', KEYS[5], 'pending')
return 1
"""

# COUNT_PLACEABLE: the stored requests of the given tasks that are still pending and that no quota or
# budget holds, each distinct one once with how many tasks hold it (tasks of one kind share their
# request, so the caller parses each once), and how many were held.
# KEYS: none (the task hashes are named from ARGV[1])
# ARGV[1] template: task hash   ARGV[2] the pending state   ARGV[3] the hash field of the wait code
# ARGV[4] the codes that hold a task, as " quota budget "   ARGV[5..] task ids
# Returns {held, req, count, req, count, ...}.
COUNT_PLACEABLE = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local counts, order, held = {}, {}, 0
for i = 5, #ARGV do
  local row = redis.call('HMGET', k(ARGV[1], ARGV[i]), 'req', 'state', ARGV[3])
  if row[1] and row[2] == ARGV[2] then
    if row[3] and row[3] ~= '' and string.find(ARGV[4], ' ' .. row[3] .. ' ', 1, true) then
      held = held + 1
    else
      if counts[row[1]] == nil then
        order[#order + 1] = row[1]
        counts[row[1]] = 0
      end
      counts[row[1]] = counts[row[1]] + 1
    end
  end
end
local out = {held}
for i, req in ipairs(order) do
  out[2 * i] = req
  out[2 * i + 1] = counts[req]
end
return out
"""

# ROTATE_TOKEN: give a user a new token, compare-and-set on their record, so of two rotations at once one
# wins and no token is left behind that nobody was shown.
# KEYS[1] the users hash   KEYS[2] the old token's key   KEYS[3] the new token's key
# ARGV[1] user   ARGV[2] the record as read   ARGV[3] the record with the new token's hash
# Returns 1 when rotated, 0 when the record changed (or went) since it was read.
ROTATE_TOKEN = r"""
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# PRUNE_OWNER: drop an owner from the set of owners with pending tasks once its queue is empty.
# KEYS[1] set of owners with pending tasks   KEYS[2] the owner's pending queue   ARGV[1] owner
PRUNE_OWNER = r"""
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"""


# Splits a script into its library (constants and functions, made once per call of the whole script)
# and its body (run once per part or item): see :func:`sequence` and :func:`each`.
LIBRARY_END = "-- library end\n"


def _split(script: str) -> tuple[str, str]:
    library, marker, body = script.partition(LIBRARY_END)
    return (library, body) if marker else ("", script)


def library(script: str) -> str:
    """The part of ``script`` above its LIBRARY_END line (its functions and constants), for a script
    that builds on them; "" for a script without one."""
    return _split(script)[0]


def _libraries(scripts: tuple[str, ...]) -> str:
    """Each distinct library once: Redis runs a script's whole text on every call, and a function
    defined inside a part would be made again for every part and item (about 8 us for the transition
    script's), so functions are defined at the top, once, and the parts share them."""
    return "".join(dict.fromkeys(library(script) for script in scripts))


def sequence(*scripts: str, finish: str = "") -> str:
    """One script that runs ``scripts`` in order, atomically, in one round trip.

    Each part keeps its own KEYS and ARGV: the caller sends every part's keys one after another,
    and ARGV starts with each part's key count and argument count (2 numbers per part) before the
    parts' own arguments. Returns the list of the parts' replies; a reply {"err", ...} stops it there.
    ``finish``: a statement run once after the parts (see :func:`alone`).
    """
    steps = "\n".join(f"local function step{i}(KEYS, ARGV)\n{_split(body)[1]}\nend" for i, body in enumerate(scripts))
    names = ", ".join(f"step{i}" for i in range(len(scripts)))
    return f"""{_libraries(scripts)}{steps}
local steps = {{{names}}}
{LIBRARY_END}local replies = {{}}
local next_key, next_arg = 1, 2 * #steps + 1
for i, step in ipairs(steps) do
  local nkeys, nargs = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local reply = step({{unpack(KEYS, next_key, next_key + nkeys - 1)}}, {{unpack(ARGV, next_arg, next_arg + nargs - 1)}})
  next_key, next_arg = next_key + nkeys, next_arg + nargs
  replies[i] = reply
  if type(reply) == 'table' and reply[1] == 'err' then break end
end
{finish}
return replies
"""


def each(script: str, finish: str = "") -> str:
    """One script that runs ``script`` once per item, atomically, in one round trip: for batches of
    independent calls (many tasks' moves), where one item's refusal does not stop the others.

    ARGV starts with the item count, then each item's key count and argument count (2 numbers per
    item); the items' keys follow one another in KEYS, and their arguments in ARGV. Returns the list
    of the items' replies, in order. ``finish``: a statement run once after the items (see :func:`alone`).
    """
    library, body = _split(script)
    return f"""{library}local function step(KEYS, ARGV)
{body}
end
{LIBRARY_END}local n = tonumber(ARGV[1])
local replies = {{}}
local next_key, next_arg = 1, 2 * n + 2
for i = 1, n do
  local nkeys, nargs = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  replies[i] = step({{unpack(KEYS, next_key, next_key + nkeys - 1)}}, {{unpack(ARGV, next_arg, next_arg + nargs - 1)}})
  next_key, next_arg = next_key + nkeys, next_arg + nargs
end
{finish}
return replies
"""


def alone(script: str, finish: str) -> str:
    """``script`` as a whole script, followed by ``finish``: a statement that writes what the body
    gathered rather than wrote (its library's), run once at the end of the script however many
    parts (:func:`sequence`) or items (:func:`each`) made up that script."""
    library, body = _split(script)
    return f"""{library}local function main(KEYS, ARGV)
{body}
end
local reply = main(KEYS, ARGV)
{finish}
return reply
"""


# EACH_CREATE: CREATE for many tasks in one call (a bulk submit's), KEYS and ARGV as :func:`each` lays
# them out; CREATE's reply for each, in order. One call of 128 spares the caller and Redis each call's
# own handling (packed, parsed, dispatched, answered): a sixth of the caller's CPU, a tenth of Redis's.
EACH_CREATE = each(CREATE)


# READ_HASHES: many hashes in one round trip (a pipeline pays the client's per-reply cost for each).
# KEYS: the hashes.  Returns one flat field/value array per key (empty for a missing key).
READ_HASHES = r"""
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

# READ_USAGE: what a usage report reads, in one round trip: per owner, from its index of days with
# usage, the ended days in a range (their counters never change, so the caller reads those it lacks
# apart) and the open days with their counters.
# KEYS: each owner's day index
# ARGV[1], ARGV[2] first and last open day number
# ARGV[3..] per owner, in KEYS order, three values: the template of its usage hashes ({id} standing
# for the day), then the first and last ended day number wanted (a first above its last: none)
# Returns per owner {ended days, oldest first; open days, oldest first; a flat field/value array per open day}.
READ_USAGE = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local function days(index, first, last)
  if tonumber(first) > tonumber(last) then return {} end
  return redis.call('ZRANGEBYSCORE', index, first, last)
end
local out = {}
for i, index in ipairs(KEYS) do
  local template, at = ARGV[3 * i], 3 * i
  local open = days(index, ARGV[1], ARGV[2])
  local counters = {}
  for j, day in ipairs(open) do counters[j] = redis.call('HGETALL', k(template, day)) end
  out[i] = {days(index, ARGV[at + 1], ARGV[at + 2]), open, counters}
end
return out
"""

# READ_WORKERS: each worker's hash, free GPUs and task ids, in one round trip.
# ARGV[1] template: worker hash   ARGV[2] template: free-GPU set   ARGV[3] template: worker task set
# ARGV[4..] worker ids.  Returns {hash fields, free GPUs, task ids} per worker id, in order.
READ_WORKERS = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  out[#out + 1] = {
    redis.call('HGETALL', k(ARGV[1], id)),
    redis.call('SMEMBERS', k(ARGV[2], id)),
    redis.call('SMEMBERS', k(ARGV[3], id)),
  }
end
return out
"""

# SNAPSHOT: what changes about every registered worker, for the scheduler (the rest is cached until
# the worker registers again, which changes registered_at).
# KEYS[1] workers zset   ARGV[1] template: worker hash   ARGV[2] template: free-GPU set
# ARGV[3..] the hash fields that change (mloc.records.CHANGING_FIELDS)
# Returns a flat array: per worker, its id, {registered_at, the changing fields} and its free GPUs.
SNAPSHOT = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HMGET', k(ARGV[1], id), 'registered_at', unpack(ARGV, 3))
  out[#out + 1] = redis.call('SMEMBERS', k(ARGV[2], id))
end
return out
"""

# WAITING: what a scheduler pass reads, in one round trip: for each owner with tasks waiting, the
# head of their queue (an equal share of ``limit``, at least one), what they hold and their quota.
# KEYS[1] set of owners with pending tasks
# ARGV[1] limit   ARGV[2] template: owner pending queue   ARGV[3] template: user usage hash
# ARGV[4] template: user quota hash   ARGV[5] template: task hash
# Returns per owner {name, {tasks, gpus} held, {tasks, gpus} quota, {task ids}, {per task: {req,
# priority, created_ms, state, pending_reason}}}.
WAITING = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local owners = redis.call('SMEMBERS', KEYS[1])
local share = math.max(1, math.floor(tonumber(ARGV[1]) / math.max(1, #owners)))
local out = {}
for _, owner in ipairs(owners) do
  local ids = redis.call('ZRANGE', k(ARGV[2], owner), 0, share - 1)
  local rows = {}
  for i, id in ipairs(ids) do
    rows[i] = redis.call('HMGET', k(ARGV[5], id), 'req', 'priority', 'created_ms', 'state', 'pending_reason')
  end
  out[#out + 1] = {
    owner,
    redis.call('HMGET', k(ARGV[3], owner), 'tasks', 'gpus'),
    redis.call('HMGET', k(ARGV[4], owner), 'tasks', 'gpus'),
    ids,
    rows,
  }
end
return out
"""
