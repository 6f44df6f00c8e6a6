"""The Lua scripts of the cluster store and the pure code around them: the checks a request asks
for, how they travel to Redis, and how a script's reply becomes an Admission.

One script, ADMIT, checks every limit of every scope a request touches and, only when all allow,
charges all of them, atomically (Redis runs a script alone), so limits are exact across routers.
Times are Redis's own clock (TIME), so routers with skewed clocks still share one timeline; a
caller may pass `now` instead (tests), but then every caller of that key must.

Algorithms, with every parameter (the same semantics as router/limits.py, in memory):

- RateCheck(rate, burst): GCRA, the token bucket's exact equivalent. Emission interval T = 1/rate;
  the key holds the theoretical arrival time TAT. A request at `now` is allowed when
  `max(TAT, now) - now <= (burst - 1) * T`, then TAT = max(TAT, now) + T; otherwise it waits
  `max(TAT, now) - now - (burst - 1) * T` seconds. A fresh key admits `burst` at once.
  `burst` defaults to max(1, ceil(rate)).
- SlotCheck(limit, ttl): concurrency leases. A sorted set of lease ids scored by expiry; expired
  leases are dropped first, then a lease is added while fewer than `limit` live (limit None: count
  only). The holder refreshes its leases (heartbeat); a dead router's leases lapse after `ttl` s.
- TokenCheck(limit, amount, window=60, resolution=1): tokens in a sliding window, one hash field
  per `resolution` s slot (slot start -> tokens); slots older than `window + resolution` are
  deleted. Allowed when used + amount <= limit (amount clamped to limit); the wait is until enough
  old slots leave. Settling moves the difference between the reservation and the real usage.
- QuotaCheck(requests_total, requests_per_day): a hash {total, day, today}; the day is the UTC day
  of the clock (days since the epoch); `today` restarts on a new day.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

# A denial whose wait is unknown (a concurrency slot frees when some request ends) or infinite
# (a used-up total quota, more tokens than the limit) travels as one of these markers.
WAIT_UNKNOWN = "?"
WAIT_NEVER = "inf"


@dataclass(frozen=True)
class RateCheck:
    key_id: str
    rate: float
    burst: float | None = None

    @property
    def effective_burst(self) -> float:
        return float(self.burst) if self.burst is not None else float(max(1, math.ceil(self.rate)))


@dataclass(frozen=True)
class SlotCheck:
    key_id: str
    limit: int | None
    ttl_s: float = 5.0


@dataclass(frozen=True)
class TokenCheck:
    key_id: str
    limit: int
    amount: int
    window_s: float = 60.0
    resolution_s: float = 1.0


@dataclass(frozen=True)
class QuotaCheck:
    key_id: str
    requests_total: int | None = None
    requests_per_day: int | None = None


Check = RateCheck | SlotCheck | TokenCheck | QuotaCheck


@dataclass(frozen=True)
class Denial:
    """One check that said no: its index in the request's checks, the limit's name (router/limits.py
    LIMIT_NAMES) and the wait in seconds (None: unknown, a slot must free; math.inf: never)."""

    index: int
    limit: str
    wait: float | None


@dataclass(frozen=True)
class Lease:
    """A concurrency slot held in Redis; release it, and keep it alive with refresh_leases."""

    redis_key: str
    lease_id: str
    ttl_s: float


@dataclass(frozen=True)
class TokenReservation:
    """Tokens charged to one slot of a window; settle once with the real usage."""

    redis_key: str
    slot: str  # the hash field: the slot's start, as the script wrote it
    amount: int
    window_s: float
    resolution_s: float


@dataclass(frozen=True)
class Admission:
    allowed: bool
    denials: tuple[Denial, ...] = ()
    leases: tuple[Lease, ...] = ()
    reservations: tuple[TokenReservation, ...] = ()

    @property
    def worst(self) -> Denial | None:
        """The denial to report, ranked as LimitSet ranks them: a wait no time cures first, then the
        longest Retry-After (ceil of the wait, >= 1; an unknown wait counts as 1 s), then the wait."""
        if not self.denials:
            return None

        def rank(d: Denial) -> tuple[bool, int, float]:
            if d.wait is not None and math.isinf(d.wait):
                return (True, 0, math.inf)
            wait = d.wait or 0.0
            return (False, max(1, math.ceil(wait - 1e-9)), wait)

        return max(self.denials, key=rank)


def redis_key(prefix: str, check: Check) -> str:
    kind = {RateCheck: "rate", SlotCheck: "slots", TokenCheck: "tpm", QuotaCheck: "quota"}[type(check)]
    return f"{prefix}{kind}:{check.key_id}"


def encode_checks(checks: Sequence[Check], lease_ids: Sequence[str | None]) -> str:
    """The checks as the JSON array ADMIT reads (ARGV[1]); `lease_ids[i]` names SlotCheck i's lease."""
    out: list[dict[str, object]] = []
    for check, lease in zip(checks, lease_ids, strict=True):
        if isinstance(check, RateCheck):
            if check.rate <= 0:
                raise ValueError(f"rate must be > 0, got {check.rate}")
            out.append({"k": "rate", "rate": float(check.rate), "burst": check.effective_burst})
        elif isinstance(check, SlotCheck):
            if lease is None:
                raise ValueError("a SlotCheck needs a lease id")
            limit = -1 if check.limit is None else int(check.limit)
            out.append({"k": "slots", "limit": limit, "ttl": float(check.ttl_s), "lease": lease})
        elif isinstance(check, TokenCheck):
            amount = max(0, min(int(check.amount), int(check.limit)))
            out.append(
                {
                    "k": "tpm",
                    "limit": int(check.limit),
                    "amount": amount,
                    "window": float(check.window_s),
                    "res": float(check.resolution_s),
                }
            )
        elif isinstance(check, QuotaCheck):
            out.append(
                {
                    "k": "quota",
                    "total": -1 if check.requests_total is None else int(check.requests_total),
                    "day": -1 if check.requests_per_day is None else int(check.requests_per_day),
                }
            )
        else:
            raise TypeError(f"not a check: {check!r}")
    return json.dumps(out, separators=(",", ":"))


def _wait(text: str) -> float | None:
    if text == WAIT_UNKNOWN:
        return None
    if text == WAIT_NEVER:
        return math.inf
    return max(0.0, float(text))


def parse_admission(
    reply: Sequence[object], checks: Sequence[Check], keys: Sequence[str], lease_ids: Sequence[str | None]
) -> Admission:
    """ADMIT's reply: [1, slot_1, ..., slot_n] when allowed (slot: the TokenCheck's slot start, else
    ""), or [0, index, limit, wait, index, limit, wait, ...] (1-based indexes) when denied."""
    items = [x.decode() if isinstance(x, bytes) else x for x in reply]
    if not items:
        raise ValueError("empty reply from the admit script")
    if int(items[0]) == 0:
        rest = items[1:]
        if len(rest) % 3:
            raise ValueError(f"malformed denial reply: {items!r}")
        denials = tuple(
            Denial(int(rest[i]) - 1, str(rest[i + 1]), _wait(str(rest[i + 2]))) for i in range(0, len(rest), 3)
        )
        return Admission(False, denials)
    slots = items[1:]
    if len(slots) != len(checks):
        raise ValueError(f"admit reply has {len(slots)} slots for {len(checks)} checks")
    leases: list[Lease] = []
    reservations: list[TokenReservation] = []
    for check, key, lease, slot in zip(checks, keys, lease_ids, slots, strict=True):
        if isinstance(check, SlotCheck):
            assert lease is not None
            leases.append(Lease(key, lease, float(check.ttl_s)))
        elif isinstance(check, TokenCheck):
            amount = max(0, min(int(check.amount), int(check.limit)))
            reservations.append(TokenReservation(key, str(slot), amount, check.window_s, check.resolution_s))
    return Admission(True, (), tuple(leases), tuple(reservations))


# Shared head of the scripts: the clock. ARGV[2] is the caller's `now` in seconds, or "" for Redis TIME.
_CLOCK = """
local now
if ARGV[2] ~= nil and ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
"""

ADMIT = (
    _CLOCK
    + """
local checks = cjson.decode(ARGV[1])
local denials = {}
local plan = {}
for i, c in ipairs(checks) do
  local key = KEYS[i]
  if c.k == 'rate' then
    local T = 1 / c.rate
    local tat = tonumber(redis.call('GET', key) or '0') or 0
    if tat < now then tat = now end
    local wait = tat - now - (c.burst - 1) * T
    if wait > 1e-9 then
      table.insert(denials, {i, 'requests_per_second', fmt(wait)})
    else
      plan[i] = tat + T
    end
  elseif c.k == 'slots' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
    if c.limit >= 0 and redis.call('ZCARD', key) >= c.limit then
      table.insert(denials, {i, 'max_concurrent', '?'})
    end
  elseif c.k == 'tpm' then
    local horizon = c.window + c.res
    local flat = redis.call('HGETALL', key)
    local used = 0
    local live = {}
    for j = 1, #flat, 2 do
      local start = tonumber(flat[j])
      local amount = tonumber(flat[j + 1])
      if start + horizon <= now then
        redis.call('HDEL', key, flat[j])
      else
        used = used + amount
        table.insert(live, {start, amount})
      end
    end
    local excess = used + c.amount - c.limit
    if excess > 0 then
      table.sort(live, function(a, b) return a[1] < b[1] end)
      local freed = 0
      local wait = 'inf'
      for _, s in ipairs(live) do
        freed = freed + s[2]
        if freed >= excess then
          wait = fmt(math.max(0, s[1] + horizon - now))
          break
        end
      end
      table.insert(denials, {i, 'tokens_per_minute', wait})
    end
  elseif c.k == 'quota' then
    local h = redis.call('HMGET', key, 'total', 'day', 'today')
    local total = tonumber(h[1]) or 0
    local today = tonumber(h[3]) or 0
    local day = math.floor(now / 86400)
    if tonumber(h[2]) ~= day then today = 0 end
    if c.total >= 0 and total >= c.total then
      table.insert(denials, {i, 'requests_total', 'inf'})
    elseif c.day >= 0 and today >= c.day then
      table.insert(denials, {i, 'requests_per_day', fmt((day + 1) * 86400 - now)})
    end
  end
end
if #denials > 0 then
  local out = {0}
  for _, d in ipairs(denials) do
    table.insert(out, d[1]); table.insert(out, d[2]); table.insert(out, d[3])
  end
  return out
end
local out = {1}
for i, c in ipairs(checks) do
  local key = KEYS[i]
  local slot = ''
  if c.k == 'rate' then
    redis.call('SET', key, fmt(plan[i]), 'PX', math.ceil((plan[i] - now) * 1000) + 1000)
  elseif c.k == 'slots' then
    redis.call('ZADD', key, fmt(now + c.ttl), c.lease)
    redis.call('PEXPIRE', key, math.ceil(c.ttl * 2000) + 1000)
  elseif c.k == 'tpm' then
    local start = math.floor(now / c.res) * c.res
    slot = fmt(start)
    if c.amount > 0 then redis.call('HINCRBY', key, slot, c.amount) end
    redis.call('PEXPIRE', key, math.ceil((c.window + 2 * c.res) * 1000))
  elseif c.k == 'quota' then
    local day = math.floor(now / 86400)
    local h = redis.call('HMGET', key, 'day', 'today')
    local today = tonumber(h[2]) or 0
    if tonumber(h[1]) ~= day then today = 0 end
    redis.call('HINCRBY', key, 'total', 1)
    redis.call('HSET', key, 'day', day, 'today', today + 1)
  end
  table.insert(out, slot)
end
return out
"""
)

# Moves `delta` tokens: > 0 is charged to the current slot; < 0 refunds `slot` (a reservation's),
# unless that slot already left the window (its tokens were given back when it expired).
_MOVE_TOKENS = """
local function move_tokens(key, slot, delta, window, res)
  if delta < 0 then
    if tonumber(slot) + window + res <= now then return 0 end
    local have = tonumber(redis.call('HGET', key, slot) or '0') or 0
    local give = math.min(-delta, have)
    if give > 0 then redis.call('HINCRBY', key, slot, -give) end
    return -give
  end
  if delta > 0 then
    redis.call('HINCRBY', key, fmt(math.floor(now / res) * res), delta)
    redis.call('PEXPIRE', key, math.ceil((window + 2 * res) * 1000))
  end
  return delta
end
"""

# KEYS[1]: the tpm hash; ARGV = {slot, now, delta, window, resolution} (ARGV[2] is the clock in
# every script).
ADD_TOKENS = (
    _CLOCK
    + _MOVE_TOKENS
    + """
return move_tokens(KEYS[1], ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# The end of a request, in one trip: settle its token reservations and drop its leases.
# KEYS = {tpm_1, ..., tpm_m, slots_1, ..., slots_k}; ARGV = {m, now, used ("" = do not settle),
# then per reservation: slot, amount, window, resolution; then lease_1, ..., lease_k}.
FINISH = (
    _CLOCK
    + _MOVE_TOKENS
    + """
local m = tonumber(ARGV[1])
local used = tonumber(ARGV[3])
for i = 1, m do
  local at = 3 + (i - 1) * 4
  if used ~= nil then
    local delta = math.max(0, used) - tonumber(ARGV[at + 2])
    move_tokens(KEYS[i], ARGV[at + 1], delta, tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]))
  end
end
for j = m + 1, #KEYS do
  redis.call('ZREM', KEYS[j], ARGV[3 + m * 4 + (j - m)])
end
return 1
"""
)

# KEYS[1]: the tpm hash; ARGV = {unused, now, window, resolution}: tokens still in the window.
TOKENS_IN_WINDOW = (
    _CLOCK
    + """
local horizon = tonumber(ARGV[3]) + tonumber(ARGV[4])
local flat = redis.call('HGETALL', KEYS[1])
local used = 0
for j = 1, #flat, 2 do
  if tonumber(flat[j]) + horizon > now then used = used + tonumber(flat[j + 1]) end
end
return used
"""
)

# KEYS: the slot sets, one per lease; ARGV = {unused, now, ttl, lease_1, ..., lease_n}. Pushes each
# live lease's expiry to now + ttl; returns the ids of those that had lapsed (they stay gone: their
# slot may already be someone else's).
REFRESH_LEASES = (
    _CLOCK
    + """
local ttl = tonumber(ARGV[3])
local lapsed = {}
for i, key in ipairs(KEYS) do
  local lease = ARGV[i + 3]
  local score = redis.call('ZSCORE', key, lease)
  if score and tonumber(score) > now then
    redis.call('ZADD', key, 'XX', fmt(now + ttl), lease)
    redis.call('PEXPIRE', key, math.ceil(ttl * 2000) + 1000)
  else
    if score then redis.call('ZREM', key, lease) end
    table.insert(lapsed, lease)
  end
end
return lapsed
"""
)

# KEYS[1]: the slot set; ARGV = {unused, now}: live leases.
SLOTS_IN_USE = (
    _CLOCK
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS[1]: the lock; ARGV[1]: the holder's token. Delete / extend only one's own lock.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
EXTEND_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
