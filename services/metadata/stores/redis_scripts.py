"""The Lua scripts of the Redis backend: every change is one script, so it is atomic.

Each script starts with the shared prelude: `P` is the key prefix, `RETAIN` how many
revisions of the change log to keep and `RETAIN_BYTES` how many bytes of keys and values it
may hold (ARGV[2] is "RETAIN:RETAIN_BYTES"), so old values are never kept beyond that.
Lease ids are random 63-bit numbers chosen by the caller (unguessable; kept as strings, never
Lua numbers, which would round them). Revisions start at Redis' clock in microseconds when the
store is first used (or after Redis lost its data), so they never repeat an earlier
incarnation's. Numbers go through `s()` because Lua would print large ones in exponent notation.

Layout under P: `:rev` (current revision), `:compacted` (log trimmed through here),
`:lease_seq`, `:log` (stream, entry id `<revision>-<n>`), `:log_bytes` (what the log holds),
`:log_sizes` (entry sizes), `:keys` (sorted set for prefix ranges), `:kv:<key>` (hash v, m,
c, l), `:lease:<id>` (expiring key: the lease is alive while it exists), `:lease:<id>:keys`
(set), `:leases` (sorted set id → deadline, for the sweeper).
"""

from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local RETAIN = tonumber(string.match(ARGV[2], '^(%d+)'))
local RETAIN_BYTES = tonumber(string.match(ARGV[2], ':(%d+)$') or '0')
local ENTRY_OVERHEAD = 64
local function s(n) return string.format('%d', n) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function init()
  if redis.call('EXISTS', P .. ':rev') == 0 then
    local t = redis.call('TIME')
    local base = t[1] .. string.sub('000000' .. t[2], -6)
    redis.call('SET', P .. ':rev', base)
    redis.call('SET', P .. ':compacted', base)
    redis.call('SET', P .. ':lease_seq', base)
  end
end
local function current_rev() return tonumber(redis.call('GET', P .. ':rev')) end
-- Drops the oldest log entries older than RETAIN revisions or while the log holds more than
-- RETAIN_BYTES (never those of revision `rev`, being written), whole revisions at a time.
-- `:log_sizes` lists "<entry id> <bytes>" in log order, so trimming never reads the values.
local function trim(rev)
  local total = tonumber(redis.call('GET', P .. ':log_bytes') or '0')
  local floor = tonumber(redis.call('GET', P .. ':compacted'))
  local by_count = rev - RETAIN
  if total <= RETAIN_BYTES and by_count <= floor then return end
  while true do
    local head = redis.call('LINDEX', P .. ':log_sizes', 0)
    if not head then
      total = 0
      if by_count > floor then redis.call('XTRIM', P .. ':log', 'MINID', '~', s(by_count + 1)) end
      break
    end
    local id, size = string.match(head, '^(%S+) (%d+)$')
    local erev = tonumber(string.match(id, '^(%d+)'))
    if erev >= rev or not (total > RETAIN_BYTES or erev <= by_count or erev == floor) then break end
    redis.call('LPOP', P .. ':log_sizes')
    redis.call('XDEL', P .. ':log', id)
    total = total - tonumber(size)
    floor = erev
  end
  if by_count > floor then floor = by_count end
  redis.call('SET', P .. ':compacted', s(floor))
  redis.call('SET', P .. ':log_bytes', s(math.max(total, 0)))
end
local function next_rev()
  local rev = redis.call('INCR', P .. ':rev')
  if rev % 64 == 0 then trim(rev) end
  return rev
end
local function emit(kind, key, value, lease, created, rev, seq)
  local id = s(rev) .. '-' .. seq
  local size = #key + #value + ENTRY_OVERHEAD
  redis.call('XADD', P .. ':log', id, 't', kind, 'k', key, 'v', value, 'l', lease, 'c', created)
  redis.call('RPUSH', P .. ':log_sizes', id .. ' ' .. size)
  local total = redis.call('INCRBY', P .. ':log_bytes', size)
  if total > RETAIN_BYTES then trim(rev) end
end
local function write(key, value, lease, rev)
  local hk = P .. ':kv:' .. key
  local old = redis.call('HMGET', hk, 'l', 'c')
  local created = 0
  local crev = old[2]
  if crev == false then
    created = 1
    crev = s(rev)
    redis.call('ZADD', P .. ':keys', 0, key)
  elseif old[1] ~= lease and old[1] ~= '0' then
    redis.call('SREM', P .. ':lease:' .. old[1] .. ':keys', key)
  end
  redis.call('HSET', hk, 'v', value, 'm', s(rev), 'c', crev, 'l', lease)
  if lease ~= '0' then redis.call('SADD', P .. ':lease:' .. lease .. ':keys', key) end
  emit('p', key, value, lease, created, rev, 0)
end
local function remove(key, value, lease, rev, seq)
  redis.call('DEL', P .. ':kv:' .. key)
  redis.call('ZREM', P .. ':keys', key)
  if lease ~= '0' then redis.call('SREM', P .. ':lease:' .. lease .. ':keys', key) end
  emit('d', key, value, lease, 0, rev, seq)
end
local function lease_alive(lease)
  return lease == '0' or redis.call('EXISTS', P .. ':lease:' .. lease) == 1
end
local function end_lease(id)
  local keys = redis.call('SMEMBERS', P .. ':lease:' .. id .. ':keys')
  redis.call('DEL', P .. ':lease:' .. id, P .. ':lease:' .. id .. ':keys')
  redis.call('ZREM', P .. ':leases', id)
  if #keys == 0 then return current_rev() end
  table.sort(keys)
  local rev = next_rev()
  for i, key in ipairs(keys) do
    local old = redis.call('HMGET', P .. ':kv:' .. key, 'v', 'l')
    if old[1] ~= false and old[2] == id then remove(key, old[1], id, rev, i - 1) end
  end
  return rev
end
init()
"""

# ARGV: P, RETAIN, key, value, lease → {1, rev} | {-1} (lease gone)
PUT = PRELUDE + r"""
if not lease_alive(ARGV[5]) then return {-1} end
local rev = next_rev()
write(ARGV[3], ARGV[4], ARGV[5], rev)
return {1, rev}
"""

# ARGV: P, RETAIN, key, expected mod revision, value, lease
# → {ok (1, 0 or -1 for lease gone), rev, v, m, c, l} (the entry after the call, if any)
CAS = PRELUDE + r"""
local hk = P .. ':kv:' .. ARGV[3]
local m = redis.call('HGET', hk, 'm')
local ok = 0
local rev = current_rev()
if (m and tonumber(m) or 0) == tonumber(ARGV[4]) then
  if not lease_alive(ARGV[6]) then return {-1} end
  rev = next_rev()
  write(ARGV[3], ARGV[5], ARGV[6], rev)
  ok = 1
end
local e = redis.call('HMGET', hk, 'v', 'm', 'c', 'l')
return {ok, rev, e[1], e[2], e[3], e[4]}
"""

# ARGV: P, RETAIN, key → {deleted, rev}
DELETE = PRELUDE + r"""
local old = redis.call('HMGET', P .. ':kv:' .. ARGV[3], 'v', 'l')
if old[1] == false then return {0, current_rev()} end
local rev = next_rev()
remove(ARGV[3], old[1], old[2], rev, 0)
return {1, rev}
"""

# ARGV: P, RETAIN, min, max, limit → {rev, key, v, m, c, l, key, ...}
RANGE = PRELUDE + r"""
local keys
if tonumber(ARGV[5]) > 0 then
  keys = redis.call('ZRANGEBYLEX', P .. ':keys', ARGV[3], ARGV[4], 'LIMIT', 0, tonumber(ARGV[5]))
else
  keys = redis.call('ZRANGEBYLEX', P .. ':keys', ARGV[3], ARGV[4])
end
local out = {current_rev()}
for _, key in ipairs(keys) do
  local e = redis.call('HMGET', P .. ':kv:' .. key, 'v', 'm', 'c', 'l')
  table.insert(out, key)
  table.insert(out, e[1]); table.insert(out, e[2]); table.insert(out, e[3]); table.insert(out, e[4])
end
return out
"""

# ARGV: P, RETAIN → {rev, compacted}
STATE = PRELUDE + r"""
return {current_rev(), tonumber(redis.call('GET', P .. ':compacted'))}
"""

# ARGV: P, RETAIN, ttl ms, id (random, chosen by the caller) → 1, or 0 when that id is in use
GRANT = PRELUDE + r"""
local id = ARGV[4]
if redis.call('EXISTS', P .. ':lease:' .. id) == 1 or redis.call('ZSCORE', P .. ':leases', id) then
  return 0
end
redis.call('SET', P .. ':lease:' .. id, ARGV[3], 'PX', ARGV[3])
redis.call('ZADD', P .. ':leases', now_ms() + tonumber(ARGV[3]), id)
return 1
"""

# ARGV: P, RETAIN, id → ttl ms, or -1 when the lease is gone
REFRESH = PRELUDE + r"""
local key = P .. ':lease:' .. ARGV[3]
local ttl = redis.call('GET', key)
if ttl == false then return -1 end
redis.call('PEXPIRE', key, ttl)
redis.call('ZADD', P .. ':leases', now_ms() + tonumber(ttl), ARGV[3])
return tonumber(ttl)
"""

# ARGV: P, RETAIN, id → {1, rev} revoked | {-1} unknown | {-2, rev} had expired (now swept)
REVOKE = PRELUDE + r"""
local alive = redis.call('EXISTS', P .. ':lease:' .. ARGV[3])
local known = redis.call('ZSCORE', P .. ':leases', ARGV[3])
if alive == 0 and known == false then return {-1} end
local rev = end_lease(ARGV[3])
if alive == 0 then return {-2, rev} end
return {1, rev}
"""

# ARGV: P, RETAIN, batch → leases ended. Run by every replica; idempotent.
SWEEP = PRELUDE + r"""
local due = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
local ended = 0
for _, id in ipairs(due) do
  local left = redis.call('PTTL', P .. ':lease:' .. id)
  if left > 0 then
    redis.call('ZADD', P .. ':leases', now_ms() + left, id)
  else
    end_lease(id)
    ended = ended + 1
  end
end
return ended
"""
