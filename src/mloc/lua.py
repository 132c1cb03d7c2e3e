"""Lua scripts, each headed by the KEYS and ARGV it takes. Key names come from :mod:`mloc.keys`:
scripts that must reach a key named by data they read (a task's worker) get a template with
``{id}`` in ARGV and fill it in, so no key string is written here."""

from __future__ import annotations

# TRANSITION: the one place a task's state changes (compare-and-set on the current state).
# KEYS[1] task hash            KEYS[2] pending zset        KEYS[3] events stream
# KEYS[4] result key           KEYS[5] usage hash (or a dummy when unused)
# KEYS[6] set of owners with usage  KEYS[7] retry-wait zset  KEYS[8] set of owners with pending tasks
# KEYS[9] the owner's index of days with usage (or a dummy when unused)
# ARGV[1] target state         ARGV[2] allowed source states, comma-separated
# ARGV[3] now (unix seconds)   ARGV[4] expected worker id ("" = any)
# ARGV[5] expected attempt ("" = any)
# ARGV[6] JSON object of extra fields to set (strings); "" fields are deleted
# ARGV[7] "1" to release the capacity the task holds on its worker
# ARGV[8] reservation JSON {worker, cpu, mem, gpus[], message} or ""
# ARGV[9] pending score ("" unless the target is pending)
# ARGV[10] "1" to count a new attempt (entering running)
# ARGV[11] result JSON or ""    ARGV[12] usage JSON {field: number} or ""
# ARGV[13] template: worker hash        ARGV[14] template: worker free-GPU set
# ARGV[15] template: worker task set    ARGV[16] template: worker stream
# ARGV[17] template: state zset         ARGV[18] scheduler wake channel
# ARGV[19] max attempts check: "1" turns a requeue into failed when attempts are used up
# ARGV[20] task id            ARGV[21] owner (for usage)
# ARGV[22] stream entry id to acknowledge and delete on the task's worker stream, or ""
# ARGV[23] the stream's consumer group
# ARGV[24] template: user usage hash   ARGV[25] template: user quota hash
# ARGV[26] unix seconds before which a requeued task may not be placed, or ""
# ARGV[27] template: owner pending queue
# ARGV[28] the usage day's number (days since 1970-01-01)   ARGV[29] the usage day (YYYY-MM-DD)
# The reservation JSON may also carry {user, max_tasks, max_gpus}: the task's owner, whose usage it
# counts, and the limits for a user without their own (0 = unlimited).
# Returns {"ok", previous state, attempt} or {"err", code, detail}; code "quota" when the
# reservation would put its user over a limit, with detail "tasks|gpus <in use> <limit>".
TRANSITION = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
-- Lua numbers print as "-0" or in exponent form; Redis integer commands need plain digits.
local function int(x) return string.format('%d', x) end
local task = KEYS[1]
local state = redis.call('HGET', task, 'state')
if not state then return {'err', 'missing', ''} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == state then allowed = true end end
if not allowed then return {'err', 'state', state} end
local worker = redis.call('HGET', task, 'worker_id') or ''
local attempt = tonumber(redis.call('HGET', task, 'attempts') or '0')
if ARGV[4] ~= '' and ARGV[4] ~= worker then return {'err', 'fenced', worker} end
if ARGV[5] ~= '' and tonumber(ARGV[5]) ~= attempt then return {'err', 'fenced', tostring(attempt)} end
local target = ARGV[1]
local now = ARGV[3]
-- Field writes are gathered and sent as one HSET at the end.
local sets = {}
local function set(name, value) sets[#sets + 1] = name; sets[#sets + 1] = value end

if ARGV[19] == '1' and target == 'pending' then
  local max = tonumber(redis.call('HGET', task, 'max_attempts') or '1')
  if attempt >= max then target = 'failed' end
end

local woke = false
if ARGV[7] == '1' then
  local hold = redis.call('HGET', task, 'hold')
  if hold and hold ~= '' and worker ~= '' then
    local h = cjson.decode(hold)
    local wkey = k(ARGV[13], worker)
    if redis.call('EXISTS', wkey) == 1 then
      redis.call('HINCRBY', wkey, 'cpu_free', int(h.cpu))
      redis.call('HINCRBY', wkey, 'mem_free', int(h.mem))
      redis.call('HINCRBY', wkey, 'slots_free', 1)
      for _, g in ipairs(h.gpus) do redis.call('SADD', k(ARGV[14], worker), int(g)) end
    end
    if h.user and h.user ~= '' then
      local ukey = k(ARGV[24], h.user)
      redis.call('HINCRBY', ukey, 'tasks', -1)
      if #h.gpus > 0 then redis.call('HINCRBY', ukey, 'gpus', 0 - #h.gpus) end
    end
    redis.call('SREM', k(ARGV[15], worker), ARGV[20])
    set('hold', '')
    woke = true
  end
end

if ARGV[8] ~= '' then
  local r = cjson.decode(ARGV[8])
  local retry_at = redis.call('HGET', task, 'retry_at')
  if retry_at and tonumber(retry_at) > tonumber(now) then return {'err', 'backoff', retry_at} end
  local user = r.user or ''
  local ukey
  if user ~= '' then
    ukey = k(ARGV[24], user)
    local q = redis.call('HMGET', k(ARGV[25], user), 'tasks', 'gpus')
    local u = redis.call('HMGET', ukey, 'tasks', 'gpus')
    local max_tasks, max_gpus = tonumber(q[1] or r.max_tasks or 0), tonumber(q[2] or r.max_gpus or 0)
    local tasks, gpus = tonumber(u[1] or '0'), tonumber(u[2] or '0')
    if max_tasks > 0 and tasks >= max_tasks then
      return {'err', 'quota', 'tasks ' .. int(tasks) .. ' ' .. int(max_tasks)}
    end
    if max_gpus > 0 and #r.gpus > 0 and gpus + #r.gpus > max_gpus then
      return {'err', 'quota', 'gpus ' .. int(gpus) .. ' ' .. int(max_gpus)}
    end
  end
  local wkey = k(ARGV[13], r.worker)
  local w = redis.call('HMGET', wkey, 'status', 'cpu_free', 'mem_free', 'slots_free')
  if w[1] ~= 'active' then return {'err', 'capacity', 'worker not active'} end
  if tonumber(w[2]) < r.cpu then return {'err', 'capacity', 'cpu'} end
  if tonumber(w[3]) < r.mem then return {'err', 'capacity', 'memory'} end
  if tonumber(w[4]) < 1 then return {'err', 'capacity', 'slots'} end
  local gkey = k(ARGV[14], r.worker)
  for _, g in ipairs(r.gpus) do
    if redis.call('SISMEMBER', gkey, int(g)) == 0 then return {'err', 'capacity', 'gpu ' .. int(g)} end
  end
  redis.call('HINCRBY', wkey, 'cpu_free', int(0 - r.cpu))
  redis.call('HINCRBY', wkey, 'mem_free', int(0 - r.mem))
  redis.call('HINCRBY', wkey, 'slots_free', -1)
  for _, g in ipairs(r.gpus) do redis.call('SREM', gkey, int(g)) end
  redis.call('SADD', k(ARGV[15], r.worker), ARGV[20])
  if ukey then
    redis.call('HINCRBY', ukey, 'tasks', 1)
    if #r.gpus > 0 then redis.call('HINCRBY', ukey, 'gpus', #r.gpus) end
  end
  set('worker_id', r.worker)
  set('hold', cjson.encode({cpu = r.cpu, mem = r.mem, gpus = r.gpus, user = user}))
  -- The attempt the worker will run, so work it finishes at once can be recorded in one step.
  redis.call('XADD', k(ARGV[16], r.worker), '*', 'task', ARGV[20], 'body', r.message, 'attempt', int(attempt + 1))
end

if ARGV[10] == '1' then
  attempt = attempt + 1
  set('attempts', int(attempt))
end

local created = redis.call('HGET', task, 'created_ms')
redis.call('ZREM', k(ARGV[17], state), ARGV[20])
redis.call('ZADD', k(ARGV[17], target), created, ARGV[20])
set('state', target)
set('updated_at', now)
if ARGV[6] ~= '' then
  local drop = {}
  for name, value in pairs(cjson.decode(ARGV[6])) do
    if value == '' then drop[#drop + 1] = name else set(name, value) end
  end
  if #drop > 0 then redis.call('HDEL', task, unpack(drop)) end
end
local delayed = target == 'pending' and ARGV[26] ~= ''
if delayed then
  set('retry_at', ARGV[26])
  set('retry_score', ARGV[9])
end
redis.call('HSET', task, unpack(sets))

-- The pending indexes: PENDING (every placeable task), the owner's queue, and the retry wait.
local owner
if target == 'pending' or state == 'pending' then owner = redis.call('HGET', task, 'owner') or '' end
if target == 'pending' then
  if delayed then
    redis.call('ZADD', KEYS[7], ARGV[26], ARGV[20])
  else
    redis.call('ZADD', KEYS[2], ARGV[9], ARGV[20])
    redis.call('ZADD', k(ARGV[27], owner), ARGV[9], ARGV[20])
    redis.call('SADD', KEYS[8], owner)
  end
  woke = true
else
  redis.call('ZREM', KEYS[2], ARGV[20])
  if state == 'pending' then
    redis.call('ZREM', KEYS[7], ARGV[20])
    local queue = k(ARGV[27], owner)
    if redis.call('ZREM', queue, ARGV[20]) == 1 and redis.call('EXISTS', queue) == 0 then
      redis.call('SREM', KEYS[8], owner)
    end
  end
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[4], ARGV[11]) end
if ARGV[12] ~= '' then
  local usage = cjson.decode(ARGV[12])
  for name, value in pairs(usage) do redis.call('HINCRBYFLOAT', KEYS[5], name, value) end
  redis.call('SADD', KEYS[6], ARGV[21])
  redis.call('ZADD', KEYS[9], ARGV[28], ARGV[29])
end
if ARGV[22] ~= '' and worker ~= '' then
  local stream = k(ARGV[16], worker)
  redis.call('XACK', stream, ARGV[23], ARGV[22])
  redis.call('XDEL', stream, ARGV[22])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'task', ARGV[20], 'from', state, 'to', target, 'ts', now)
-- A delayed retry also wakes the scheduler, so it learns when to look again.
if woke and (delayed or redis.call('ZCARD', KEYS[2]) > 0) then redis.call('PUBLISH', ARGV[18], target) end
return {'ok', state, tostring(attempt), target}
"""

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

# CREATE: store a new task, pending, with its indexes.
# KEYS[1] task hash   KEYS[2] all-tasks zset   KEYS[3] pending-state zset   KEYS[4] owner zset
# KEYS[5] pending queue zset  KEYS[6] the owner's pending queue  KEYS[7] set of owners with pending tasks
# ARGV[1] task id     ARGV[2] created ms       ARGV[3] pending score ("" = not for the scheduler)
# ARGV[4] owner       ARGV[5..] field, value, ...
# Returns 1, or 0 if a task with that id exists.
CREATE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
  redis.call('SADD', KEYS[7], ARGV[4])
end
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

# PRUNE_OWNER: drop an owner from the set of owners with pending tasks once its queue is empty.
# KEYS[1] set of owners with pending tasks   KEYS[2] the owner's pending queue   ARGV[1] owner
PRUNE_OWNER = r"""
if redis.call('EXISTS', KEYS[2]) == 0 then return redis.call('SREM', KEYS[1], ARGV[1]) end
return 0
"""


def sequence(*scripts: str) -> str:
    """One script that runs ``scripts`` in order, atomically, in one round trip.

    Each part keeps its own KEYS and ARGV: the caller sends every part's keys one after another,
    and ARGV starts with each part's key count and argument count (2 numbers per part) before the
    parts' own arguments. Returns the list of the parts' replies; a reply {"err", ...} stops it there.
    """
    steps = "\n".join(f"local function step{i}(KEYS, ARGV)\n{body}\nend" for i, body in enumerate(scripts))
    names = ", ".join(f"step{i}" for i in range(len(scripts)))
    return f"""{steps}
local steps = {{{names}}}
local replies = {{}}
local next_key, next_arg = 1, 2 * #steps + 1
for i, step in ipairs(steps) do
  local nkeys, nargs = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local reply = step({{unpack(KEYS, next_key, next_key + nkeys - 1)}}, {{unpack(ARGV, next_arg, next_arg + nargs - 1)}})
  next_key, next_arg = next_key + nkeys, next_arg + nargs
  replies[i] = reply
  if type(reply) == 'table' and reply[1] == 'err' then break end
end
return replies
"""


# SUBMIT: CREATE then TRANSITION (placing the new task on its worker), for a submit whose worker is
# already chosen. TRANSITION_TWICE: two transitions of one task, for work that finished before its
# start was recorded (see mloc.worker.runner). Both take KEYS/ARGV as :func:`sequence` says.
SUBMIT = sequence(CREATE, TRANSITION)
TRANSITION_TWICE = sequence(TRANSITION, TRANSITION)

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
# Returns a flat array: per worker, its id, {registered_at, status, last_heartbeat, cpu_free,
# mem_free, slots_free, warm_models} and its free GPUs.
SNAPSHOT = r"""
local function k(template, id) return (string.gsub(template, "{id}", id)) end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HMGET', k(ARGV[1], id), 'registered_at', 'status', 'last_heartbeat', 'cpu_free',
    'mem_free', 'slots_free', 'warm_models')
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
