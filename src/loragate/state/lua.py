"""Lua scripts of ``RedisStore``. Each runs atomically on the Redis server.

The residency functions (``lru_touch``, ``res_touch``: a routed request and a load alike)
implement exactly the transitions of ``state/residency.py``;
``tests/state/test_lua_equivalence.py`` checks that both give the same result on random
sequences. Lease expiry uses the Redis server clock (``TIME``),
so gateway hosts need no synchronised clocks.
"""

from __future__ import annotations

_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function lru_touch(key, item, cap)
  redis.call('LREM', key, 0, item)
  redis.call('RPUSH', key, item)
  local evicted = {}
  local n = redis.call('LLEN', key)
  while n > cap do
    evicted[#evicted + 1] = redis.call('LPOP', key)
    n = n - 1
  end
  return evicted
end

local function caps(info_key, default_gpu, default_cpu)
  local v = redis.call('HMGET', info_key, 'max_loras', 'max_cpu_loras')
  local g = tonumber(v[1]) or tonumber(default_gpu)
  local c = tonumber(v[2]) or tonumber(default_cpu)
  if g < 1 then g = 1 end
  if c < g then c = g end
  return g, c
end

-- an adapter joined or left the replica's registered set: the replica's next change number
-- (``stamps`` field '', counting up: a total order, where two writes or a write and a read
-- in the same millisecond of the server's clock were not ordered) and by whom
local function stamp(stamps, adapter, who)
  local n = redis.call('HINCRBY', stamps, '', 1)
  redis.call('HSET', stamps, adapter, n .. ' ' .. who)
end

-- residency keys: reg (SET), gpu (LIST), cpu (LIST), info (HASH), stamps (HASH)
-- A routed request or a load (vLLM's add_adapter ends with activate_adapter): registered,
-- most recent in the CPU cache (its evicted leave their slots too) and in the GPU slots.
local function res_touch(reg, gpu, cpu, info, adapter, dg, dc, stamps, who)
  local g, c = caps(info, dg, dc)
  if redis.call('SADD', reg, adapter) == 1 then stamp(stamps, adapter, who) end
  local evicted = lru_touch(cpu, adapter, c)
  for _, e in ipairs(evicted) do redis.call('LREM', gpu, 0, e) end
  lru_touch(gpu, adapter, g)
end

-- a config-file definition's time left, ms (<= 0: lapsed): its until, or the longest lease
-- of the claims that hold it (``by``: instance -> generation; ``P deflease:I|G``)
local function def_left(e, now, lease_base)
  local left = tonumber(e['until']) - now
  if type(e.by) == 'table' then
    for inst, gen in pairs(e.by) do
      local p = redis.call('PTTL', lease_base .. inst .. '|' .. gen)
      if p > left then left = p end
    end
  end
  return left
end

-- the replica does not hold the adapter (an unload, or a load it refused)
local function res_unload(reg, gpu, cpu, adapter, stamps, who)
  if redis.call('SREM', reg, adapter) == 1 then stamp(stamps, adapter, who) end
  redis.call('LREM', gpu, 0, adapter)
  redis.call('LREM', cpu, 0, adapter)
end

-- one entry with its own expiry (hash field -> '<until ms> <value>': a refusal, a hold of a
-- replica shutting down); the hash lives as long as its last entry
local function set_until(key, field, value, ttl, now)
  redis.call('HSET', key, field, string.format('%.0f', now + ttl) .. ' ' .. value)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end

-- the entries of such a hash in force: {field, value, ms left, ...}; the others are deleted
local function in_force(key, now)
  local out = {}
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local v = all[i + 1]
    local sp = string.find(v, ' ', 1, true)
    local left = -1
    if sp then left = (tonumber(string.sub(v, 1, sp - 1)) or 0) - now end
    if left > 0 then
      out[#out + 1] = all[i]
      out[#out + 1] = string.sub(v, sp + 1)
      out[#out + 1] = left
    else
      redis.call('HDEL', key, all[i])
    end
  end
  return out
end

-- drop from a list the items not in keep (order kept); writes nothing if it has none
local function list_filter(key, keep)
  local items = redis.call('LRANGE', key, 0, -1)
  local kept = {}
  for _, a in ipairs(items) do
    if keep[a] then kept[#kept + 1] = a end
  end
  if #kept == #items then return end
  redis.call('DEL', key)
  for _, a in ipairs(kept) do redis.call('RPUSH', key, a) end
end
"""

# KEYS: inflight, reg, gpu, cpu, info, stamps, demand
# ARGV: lease member ('' = none), lease ttl ms, adapter ('' = base model), default max_loras,
#       default max_cpu_loras, demand ttl s, instance id
BEGIN = (
    _COMMON
    + """
if ARGV[1] ~= '' then
  local now = now_ms()
  local ttl = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ARGV[3] ~= '' then
  res_touch(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], ARGV[4], ARGV[5], KEYS[6], ARGV[7])
  redis.call('HINCRBY', KEYS[7], ARGV[3], 1)
  redis.call('EXPIRE', KEYS[7], ARGV[6])
end
return 1
"""
)

# KEYS: reg, gpu, cpu, info, stamps
# ARGV: op ('load' | 'unload' | 'reconcile'), default max_loras, default max_cpu_loras,
#       instance id, since (reconcile: the replica's change number at the caller's last read
#       of the shared state, a snapshot's row; '' = never read), adapters…
RESIDENCY = (
    _COMMON
    + """
local op = ARGV[1]
local who = ARGV[4]
if op == 'load' then
  res_touch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[6], ARGV[2], ARGV[3], KEYS[5], who)
elseif op == 'unload' then
  res_unload(KEYS[1], KEYS[2], KEYS[3], ARGV[6], KEYS[5], who)
elseif op == 'reconcile' then
  -- the registered set becomes ARGV[6..]: only the difference is written (an unchanged set,
  -- every poll of an idle replica, writes nothing), and an adapter another instance added
  -- or removed after the caller's last read (a change number above since) keeps its state:
  -- the caller's poll may predate that write (a poll journaled during an outage, replayed
  -- later)
  local since = tonumber(ARGV[5])
  local function newer(a)
    if not since or a == '' then return false end
    local s = redis.call('HGET', KEYS[5], a)
    if not s then return false end
    local sp = string.find(s, ' ', 1, true)
    if not sp then return false end
    return (tonumber(string.sub(s, 1, sp - 1)) or 0) > since and string.sub(s, sp + 1) ~= who
  end
  local seen = {}
  for i = 6, #ARGV do seen[ARGV[i]] = true end
  local keep = {}
  for _, a in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if seen[a] or newer(a) then
      keep[a] = true
    else
      redis.call('SREM', KEYS[1], a)
      stamp(KEYS[5], a, who)
    end
  end
  for i = 6, #ARGV do
    local a = ARGV[i]
    if not keep[a] and not newer(a) then
      redis.call('SADD', KEYS[1], a)
      stamp(KEYS[5], a, who)
      keep[a] = true
    end
  end
  list_filter(KEYS[2], keep)
  list_filter(KEYS[3], keep)
else
  return redis.error_reply('unknown residency op ' .. op)
end
return 1
"""
)

# KEYS: replicas, version, adapters, epoch, refusals, tombstones, drains, readers, stopping
# ARGV: per-replica key prefix, version the caller already knows ('' = none), the reading
#       instance's id ('' = a read not recorded), reader ttl ms
# Returns {version, epoch or '', adapters (flat HGETALL) or 0 if unchanged, refusals,
# tombstones, drains, readers, stopping, rows…}; refusals = {field, JSON, ms left, …} of the
# refusals in force, tombstones = {name, ms left, …} of the tombstones in force, stopping =
# {replica id, what it answered, ms left, …} of the holds of replicas shutting down in force
# (expired entries of the three are deleted); drains = the drained replicas (flat HGETALL:
# id, since); readers = {instance, ms of its last read, …} (flat HGETALL; this read recorded
# first; entries past the ttl deleted); row = {id, info (flat HGETALL), registered, gpu, cpu,
# in-flight count, change number of the registered set (stamps field '', 0 if none)}.
SNAPSHOT = (
    _COMMON
    + """
local now = now_ms()
local version = redis.call('GET', KEYS[2]) or '0'
local epoch = redis.call('GET', KEYS[4]) or ''
local adapters = 0
if version ~= ARGV[2] then adapters = redis.call('HGETALL', KEYS[3]) end
local refusals = in_force(KEYS[5], now)
local tombstones = {}
local ts = redis.call('HGETALL', KEYS[6])
for i = 1, #ts, 2 do
  local left = (tonumber(ts[i + 1]) or 0) - now
  if left > 0 then
    tombstones[#tombstones + 1] = ts[i]
    tombstones[#tombstones + 1] = left
  else
    redis.call('HDEL', KEYS[6], ts[i])
  end
end
local reader_ttl = tonumber(ARGV[4])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[8], ARGV[3], string.format('%.0f', now))
  redis.call('PEXPIRE', KEYS[8], reader_ttl)
end
local readers = {}
local rd = redis.call('HGETALL', KEYS[8])
for i = 1, #rd, 2 do
  if now - (tonumber(rd[i + 1]) or 0) < reader_ttl then
    readers[#readers + 1] = rd[i]
    readers[#readers + 1] = rd[i + 1]
  else
    redis.call('HDEL', KEYS[8], rd[i])
  end
end
local out = {version, epoch, adapters, refusals, tombstones, redis.call('HGETALL', KEYS[7]),
  readers, in_force(KEYS[9], now)}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local base = ARGV[1] .. id
  out[#out + 1] = {
    id,
    redis.call('HGETALL', base),
    redis.call('SMEMBERS', base .. ':reg'),
    redis.call('LRANGE', base .. ':gpu', 0, -1),
    redis.call('LRANGE', base .. ':cpu', 0, -1),
    redis.call('ZCOUNT', base .. ':inflight', '(' .. now, '+inf'),
    redis.call('HGET', base .. ':stamps', '') or '0',
  }
end
return out
"""
)

# KEYS: drains; ARGV: replica id, since (epoch seconds; '' = now, by the server's clock)
# Drains the replica unless it is drained already. Returns {1 if it was not, the since in
# force} (the since as a string: a Lua number would come back as an integer).
SET_DRAIN = (
    _COMMON
    + """
local since = redis.call('HGET', KEYS[1], ARGV[1])
if since then return {0, since} end
since = ARGV[2]
if since == '' then since = string.format('%.3f', now_ms() / 1000) end
redis.call('HSET', KEYS[1], ARGV[1], since)
return {1, since}
"""
)

# KEYS: the in-flight ZSETs of the replicas the instance has (or had) leases on
# ARGV: member prefix of this instance ('<instance>|'), ttl ms, then for each key: the number
#       of members n, followed by its n members.
# Makes this instance's leases on each key exactly the given set, all expiring in ttl ms.
SYNC_LEASES = (
    _COMMON
    + """
local now = now_ms()
local prefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local pos = 3
for k = 1, #KEYS do
  local key = KEYS[k]
  local n = tonumber(ARGV[pos])
  local want = {}
  for i = 1, n do want[ARGV[pos + i]] = true end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix and not want[m] then redis.call('ZREM', key, m) end
  end
  for i = 1, n do redis.call('ZADD', key, now + ttl, ARGV[pos + i]) end
  if n > 0 then redis.call('PEXPIRE', key, ttl) end
  pos = pos + n + 1
end
return 1
"""
)

# KEYS: replica info HASH; ARGV: healthy ('1' | '0'), updated_s. No-op for unknown replicas.
SET_HEALTH = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'healthy', ARGV[1], 'updated_s', ARGV[2])
  return 1
end
return 0
"""

# KEYS: adapters, version, tombstones, restored, epoch, definitions; ARGV: name, JSON spec,
# the epoch the caller knows ('' = any), the definition leases' prefix (``P deflease:``).
# Registers the adapter only if the name is free (not registered, and no instance's config
# file defines it: no definition in force, see CLAIM_DEFINITIONS), bumping the version,
# clearing its tombstone and its mark of an entry a resync wrote back: returns 1; else 0; -1
# (nothing done) if the epoch is not the caller's (Redis lost its data since).
PUT_ADAPTER = (
    _COMMON
    + """
if ARGV[3] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[3] then return -1 end
local defined = redis.call('HGET', KEYS[6], ARGV[1])
if defined and def_left(cjson.decode(defined), now_ms(), ARGV[4]) > 0 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""
)

# KEYS: adapters, version, epoch; ARGV: name, JSON spec, the JSON spec expected there ('' =
# any), the epoch the caller knows ('' = any). Replaces a registered adapter's definition
# (PUT /admin/adapters/N), bumping the version: returns {1, the JSON replaced}; {0} (nothing
# done) if the name is not registered or not as expected; -1 (nothing done) if the epoch is
# not the caller's.
REPLACE_ADAPTER = (
    _COMMON
    + """
if ARGV[4] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[4] then return -1 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or (ARGV[3] ~= '' and old ~= ARGV[3]) then return {0} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return {1, old}
"""
)

# KEYS: adapters, version, tombstones, epoch; ARGV: name, tombstone ttl ms, the epoch the
# caller knows ('' = any). Deletes the adapter and leaves its tombstone (name -> until ms,
# Redis server time). Returns 1 if it existed, else 0; -1 (nothing done) if the epoch is not
# the caller's.
DELETE_ADAPTER = (
    _COMMON
    + """
if ARGV[3] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[3] then return -1 end
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  local ttl = tonumber(ARGV[2])
  redis.call('HSET', KEYS[3], ARGV[1], string.format('%.0f', now_ms() + ttl))
  if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""
)

# KEYS: leader key; ARGV: holder, ttl ms. Acquire if free, renew if ours.
LEADER_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: leader key; ARGV: holder.
LEADER_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: epoch; ARGV: a fresh token. Returns {epoch, 1 if this call created it}.
ENSURE_EPOCH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return {ARGV[1], 1} end
return {redis.call('GET', KEYS[1]), 0}
"""

# KEYS: replicas, adapters, version, refusals, tombstones, restored, drains, stopping
# ARGV: per-replica key prefix, JSON {"version": n, "adapters": {name: json},
#       "replicas": [{"id", "info": [k, v, …], "reg": [], "gpu": [], "cpu": []}],
#       "refusals": [[field, json, ms left], …], "tombstones": [[name, ms left], …],
#       "drains": [[replica id, since], …], "stopping": [[replica id, error, ms left], …]},
#       tombstone ttl ms
# Fills in what is missing after Redis lost its data; never overwrites what is there (another
# gateway may have pushed first), so the first instance back wins per replica (and refusal,
# and drain). Returns the ids of the drains it wrote back.
# Deletions win over stale views: a tombstone is written back with the time it has left, an
# adapter is not written back while its name has a tombstone in force, and a tombstone removes
# an adapter that another instance's push wrote back (marked in ``restored``), but not one
# registered through the admin API since the restart (newer than the deletion).
PUSH_MISSING = (
    _COMMON
    + """
local state = cjson.decode(ARGV[2])
local now = now_ms()
local ttl = tonumber(ARGV[3])
local changed = false
for _, x in ipairs(state.refusals) do
  if redis.call('HEXISTS', KEYS[4], x[1]) == 0 then
    set_until(KEYS[4], x[1], x[2], tonumber(x[3]), now)
  end
end
for _, x in ipairs(state.stopping) do
  if redis.call('HEXISTS', KEYS[8], x[1]) == 0 then
    set_until(KEYS[8], x[1], x[2], tonumber(x[3]), now)
  end
end
local drains = {}
for _, d in ipairs(state.drains) do
  if redis.call('HSETNX', KEYS[7], d[1], d[2]) == 1 then drains[#drains + 1] = d[1] end
end
for _, r in ipairs(state.replicas) do
  local base = ARGV[1] .. r.id
  if redis.call('EXISTS', base) == 0 then
    redis.call('HSET', base, unpack(r.info))
    redis.call('SADD', KEYS[1], r.id)
  end
  if redis.call('EXISTS', base .. ':reg', base .. ':gpu', base .. ':cpu') == 0 then
    for _, a in ipairs(r.reg) do redis.call('SADD', base .. ':reg', a) end
    for _, a in ipairs(r.gpu) do redis.call('RPUSH', base .. ':gpu', a) end
    for _, a in ipairs(r.cpu) do redis.call('RPUSH', base .. ':cpu', a) end
  end
end
for _, t in ipairs(state.tombstones) do
  local name, left = t[1], tonumber(t[2])
  local held = redis.call('HEXISTS', KEYS[2], name) == 1
  if held and redis.call('SISMEMBER', KEYS[6], name) == 1 then
    redis.call('HDEL', KEYS[2], name)
    redis.call('SREM', KEYS[6], name)
    held = false
    changed = true
  end
  if not held and left > 0 then
    local until_ms = now + left
    if until_ms > (tonumber(redis.call('HGET', KEYS[5], name)) or 0) then
      redis.call('HSET', KEYS[5], name, string.format('%.0f', until_ms))
      if redis.call('PTTL', KEYS[5]) < left then redis.call('PEXPIRE', KEYS[5], left) end
    end
  end
end
local restored = false
for name, spec in pairs(state.adapters) do
  if (tonumber(redis.call('HGET', KEYS[5], name)) or 0) <= now
      and redis.call('HSETNX', KEYS[2], name, spec) == 1 then
    redis.call('SADD', KEYS[6], name)
    restored = true
  end
end
if restored then redis.call('PEXPIRE', KEYS[6], ttl) end
local v = tonumber(redis.call('GET', KEYS[3]) or '0')
if v <= tonumber(state.version) then
  redis.call('SET', KEYS[3], tonumber(state.version) + 1)
elseif changed then
  redis.call('INCR', KEYS[3])
end
return drains
"""
)

# KEYS: refusals, the replica's reg, gpu, cpu, stamps; ARGV: field, ttl ms (0: not
# remembered), JSON {path, error}, adapter, instance id. Sets (or replaces; ttl 0: deletes)
# one refusal and drops the adapter from the replica's shadow residency (it did not register
# there), in one step: no reader sees one without the other.
RECORD_REFUSAL = (
    _COMMON
    + """
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  set_until(KEYS[1], ARGV[1], ARGV[3], ttl, now_ms())
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
res_unload(KEYS[2], KEYS[3], KEYS[4], ARGV[4], KEYS[5], ARGV[5])
return 1
"""
)

# KEYS: stopping; ARGV: replica id, ttl ms, what it answered. Holds the replica (or renews
# its hold) for ttl ms.
HOLD_STOPPING = (
    _COMMON
    + """
set_until(KEYS[1], ARGV[1], ARGV[3], tonumber(ARGV[2]), now_ms())
return 1
"""
)

# KEYS: refusals; ARGV: adapter, field ('' = the adapter's refusals by every replica).
# Returns how many were deleted.
FORGET_REFUSALS = """
if ARGV[2] ~= '' then return redis.call('HDEL', KEYS[1], ARGV[2]) end
local n = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if cjson.decode(f)[2] == ARGV[1] then n = n + redis.call('HDEL', KEYS[1], f) end
end
return n
"""

# KEYS: definitions, version, adapters; ARGV: claim ttl ms, instance id, JSON list of claims
# [{"name", "path", "rank", "prev": [path, rank]?, "known": [path, rank, instance, left ms]?}],
# the instance name of an admin registration (``definitions.REGISTERED``), the definition
# leases' prefix (``P deflease:``), this claim's generation.
# The rule of ``state.definitions.decide``, for each claim in turn; entries are JSON
# {"path", "rank", "instance", "until", "by"} (until: Redis server time, ms; by: instance ->
# generation of the claims holding it); a lapsed entry (``def_left``) counts as none. This
# instance's lease of this generation (``P deflease:I|G``) is set, ttl long: every entry in
# force that agrees with its claim gets it in ``by`` (dead leases there are dropped), so that
# renewing the lease (RENEW_DEFINITIONS) renews them all; an entry that has it already is not
# written again (a claim of the same names keeps its generation: only reads).
# A name registered through the admin API (``adapters``) is the registration's: nothing is
# written for it. Bumps the version if a definition changed. Returns [name, JSON [path, rank,
# instance, left ms], ...]: the definitions in force for the claimed names.
CLAIM_DEFINITIONS = (
    _COMMON
    + """
local now = now_ms()
local ttl = tonumber(ARGV[1])
local me, base, gen = ARGV[2], ARGV[5], ARGV[6]
local out = {}
local changed = false
redis.call('SET', base .. me .. '|' .. gen, '1', 'PX', ttl)
local function agrees(e, path, rank)
  return e.path == path and tonumber(e.rank) == tonumber(rank)
end
local function ours(e)
  local by = {}
  if type(e.by) == 'table' then
    for inst, g in pairs(e.by) do
      if inst ~= me and redis.call('PTTL', base .. inst .. '|' .. g) > 0 then by[inst] = g end
    end
  end
  by[me] = gen
  e.by = by
  return e
end
for _, c in ipairs(cjson.decode(ARGV[3])) do
  local cur = nil
  local new = nil
  local reg = redis.call('HGET', KEYS[3], c.name)
  if reg then
    local r = cjson.decode(reg)
    cur = {path = r.path, rank = r.rank, instance = ARGV[4], ['until'] = now + ttl}
  else
    local raw = redis.call('HGET', KEYS[1], c.name)
    if raw then
      cur = cjson.decode(raw)
      if def_left(cur, now, base) <= 0 then cur = nil end
    end
  end
  if reg then
    -- the registration's: nothing to claim
  elseif cur == nil then
    local k = c.known
    changed = true
    if k and tonumber(k[4]) > 0 and not agrees({path = k[1], rank = k[2]}, c.path, c.rank) then
      new = {path = k[1], rank = k[2], instance = k[3], ['until'] = now + tonumber(k[4])}
    elseif k and agrees({path = k[1], rank = k[2]}, c.path, c.rank) then
      new = ours({path = k[1], rank = k[2], instance = k[3], ['until'] = now + ttl})
    else
      new = ours({path = c.path, rank = c.rank, instance = me, ['until'] = now + ttl})
    end
  elseif agrees(cur, c.path, c.rank) then
    if type(cur.by) ~= 'table' or cur.by[me] ~= gen then  -- (else held by our lease already)
      cur['until'] = now + ttl
      new = ours(cur)
    end
  elseif c.prev and agrees(cur, c.prev[1], c.prev[2]) then
    changed = true
    new = ours({path = c.path, rank = c.rank, instance = me, ['until'] = now + ttl})
  end
  if new then
    redis.call('HSET', KEYS[1], c.name, cjson.encode(new))
    cur = new
  end
  out[#out + 1] = c.name
  out[#out + 1] = cjson.encode({cur.path, cur.rank, cur.instance, def_left(cur, now, base)})
end
if #out > 0 and redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
if changed then redis.call('INCR', KEYS[2]) end
return out
"""
)

# KEYS: this instance's definition lease (``P deflease:I|G`` of its last claim), definitions;
# ARGV: ttl ms. Renews every definition that claim holds (one PEXPIRE, whatever their
# number) and the hash's own expiry: 1; 0 (nothing done) if the lease or the hash is gone
# (Redis lost its data, or the lease lapsed): the caller claims in full (CLAIM_DEFINITIONS).
RENEW_DEFINITIONS = """
local ttl = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[2])
if left == -2 or redis.call('PEXPIRE', KEYS[1], ttl) == 0 then return 0 end
if left < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""
