"""Lua scripts, each headed by the KEYS and ARGV it takes. Key names come from :mod:`mloc.keys`:
scripts that must reach a key named by data they read (a task's worker) get a template with
``{id}`` in ARGV and fill it in, so no key string is written here."""

from __future__ import annotations

# TRANSITION: the one place a task's state changes (compare-and-set on the current state).
# KEYS[1] task hash            KEYS[2] pending zset        KEYS[3] events stream
# KEYS[4] result key           KEYS[5] usage hash (or a dummy when unused)
# KEYS[6] set of owners with usage
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
# Returns {"ok", previous state, attempt} or {"err", code, detail}.
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
    redis.call('SREM', k(ARGV[15], worker), ARGV[20])
    set('hold', '')
    woke = true
  end
end

if ARGV[8] ~= '' then
  local r = cjson.decode(ARGV[8])
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
  set('worker_id', r.worker)
  set('hold', cjson.encode({cpu = r.cpu, mem = r.mem, gpus = r.gpus}))
  redis.call('XADD', k(ARGV[16], r.worker), '*', 'task', ARGV[20], 'body', r.message)
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
redis.call('HSET', task, unpack(sets))

if target == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[9], ARGV[20])
  woke = true
else
  redis.call('ZREM', KEYS[2], ARGV[20])
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[4], ARGV[11]) end
if ARGV[12] ~= '' then
  local usage = cjson.decode(ARGV[12])
  for name, value in pairs(usage) do redis.call('HINCRBYFLOAT', KEYS[5], name, value) end
  redis.call('SADD', KEYS[6], ARGV[21])
end
if ARGV[22] ~= '' and worker ~= '' then
  local stream = k(ARGV[16], worker)
  redis.call('XACK', stream, ARGV[23], ARGV[22])
  redis.call('XDEL', stream, ARGV[22])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'task', ARGV[20], 'from', state, 'to', target, 'ts', now)
if woke and redis.call('ZCARD', KEYS[2]) > 0 then redis.call('PUBLISH', ARGV[18], target) end
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
# KEYS[5] pending queue zset
# ARGV[1] task id     ARGV[2] created ms       ARGV[3] pending score ("" = not for the scheduler)
# ARGV[4..] field, value, ...
# Returns 1, or 0 if a task with that id exists.
CREATE = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1]) end
return 1
"""
