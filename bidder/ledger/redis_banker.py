"""The Redis banker (``bidder serve --ledger redis://HOST:PORT/DB``): the accounts of many machines in one Redis.

Each ``sync`` is one Lua script, so Redis applies a holder's step whole, between any two steps of other
holders: the same steps as ``bidder.ledger.book.Book`` (its docstring has the accounts and the states of a
bid), written in Lua. Money is integer nano-USD; Lua counts in doubles, exact up to 2^53 nano-USD (9 million
USD per account), and every number reaches Redis formatted as an integer (``%.0f``).

Persistence is Redis's: run it with ``--appendonly yes`` (AOF); with the default ``appendfsync everysec`` a
crash of Redis loses at most the last second of steps. The notices' dedup (``RedisNoticeStore``) lives in the
same database: ``SET key 1 NX EX ttl`` is atomic, so a notice is counted once across every worker of every
machine. Keys are under ``bidder:ledger:`` and ``bidder:notice:``; the script names keys it computes, so the
database must be a single Redis (not Redis Cluster).
"""
from __future__ import annotations

import json
import math
from typing import Sequence
from urllib.parse import urlsplit

from bidder.ledger.book import EXPIRE_BATCH, TOTAL, CampaignSync, Grant, Impression, Reservation, Settlement

__all__ = ["PREFIX", "RedisBanker", "RedisNoticeStore", "connect"]

PREFIX = "bidder:ledger:"
NOTICE_PREFIX = "bidder:notice:"

_SYNC = r"""
local P = KEYS[1]
local a = cjson.decode(ARGV[1])
local now, retention, limit = a.now, a.retention, a.limit
local function n(x) return string.format('%.0f', x) end
local function num(x) return tonumber(x) or 0 end

-- a call's account changes are summed here and written once at its end (it moves the same few accounts often)
local changes, order = {}, {}
local function change(k, field, x)
  if x == 0 then return end
  local fields = changes[k]
  if fields == nil then fields = {}; changes[k] = fields; table.insert(order, k) end
  fields[field] = (fields[field] or 0) + x
end
local function add(c, period, spent, reserved, leased)
  local k = P .. 'acct:' .. c
  change(k, period .. ':s', spent)
  change(k, period .. ':r', reserved)
  change(k, period .. ':l', leased)
end
local function account(c, period)
  local k = P .. 'acct:' .. c
  local v = redis.call('HMGET', k, period .. ':s', period .. ':r', period .. ':l')
  local pending = changes[k] or {}
  return num(v[1]) + (pending[period .. ':s'] or 0), num(v[2]) + (pending[period .. ':r'] or 0),
         num(v[3]) + (pending[period .. ':l'] or 0)
end
local hold_key = P .. 'hold:' .. a.holder
local function hold(c)
  local v = redis.call('HMGET', hold_key, c, c .. '|day')
  return num(v[1]), (v[2] or '')
end
local function set_hold(c, lease, day)
  redis.call('HSET', hold_key, c, n(lease), c .. '|day', day)
end

local FINAL = {billed = true, lost = true, expired = true}
local function get_bid(id)
  local v = redis.call('HMGET', P .. 'bid:' .. id, 'c', 'day', 'amount', 'funded', 'state', 'price', 'expires',
                      'user', 'creative')
  if not v[1] then return nil end
  return {id = id, c = v[1], day = v[2], amount = num(v[3]), funded = v[4] == '1', state = v[5],
          price = num(v[6]), expires = num(v[7]), user = v[8] or '', creative = v[9] or ''}
end
local function impression(r)
  if r.user ~= '' then
    local seq = redis.call('INCR', P .. 'impseq')
    redis.call('ZADD', P .. 'imps', seq, table.concat({seq, r.c, r.creative, r.user, string.format('%.17g', now)},
                                                      '\t'))
  end
end
local function put_bid(r)
  local k = P .. 'bid:' .. r.id
  redis.call('HSET', k, 'c', r.c, 'day', r.day, 'amount', n(r.amount), 'funded', r.funded and '1' or '0',
             'state', r.state, 'price', n(r.price), 'expires', string.format('%.17g', r.expires), 'user', r.user,
             'creative', r.creative)
  if FINAL[r.state] then
    redis.call('ZREM', P .. 'due', r.id)
    redis.call('ZADD', P .. 'keep', string.format('%.17g', r.expires + retention), r.id)
  else
    redis.call('ZADD', P .. 'due', string.format('%.17g', r.expires), r.id)
  end
end
local function move(r, spent, reserved)
  add(r.c, 'T', spent, reserved, 0)
  add(r.c, r.day, spent, reserved, 0)
end

local lease_day = {}
for _, c in ipairs(a.campaigns) do
  local name, cday, held = c[1], c[2], math.max(c[5], 0)
  local lease, day = hold(name)
  if day == '' then day = cday end
  lease_day[name] = day
  if held ~= lease then
    add(name, 'T', 0, 0, held - lease)
    add(name, day, 0, 0, held - lease)
    set_hold(name, held, day)
  end
end

for _, r in ipairs(a.reservations) do
  local id, name, amount, expires, user, creative, day = r[1], r[2], r[3], r[4], r[5], r[6], r[7]
  local row = get_bid(id)
  if row == nil then
    if day == nil or day == '' then day = lease_day[name] end  -- the bid's day, even when the lease moved on since
    if day == nil then local _; _, day = hold(name) end
    row = {id = id, c = name, day = day, amount = amount, funded = true, state = 'open', price = 0,
           expires = expires, user = user, creative = creative}
    move(row, 0, amount)
    put_bid(row)
  elseif not row.funded then
    row.amount, row.funded, row.user, row.creative = amount, true, user, creative
    if not FINAL[row.state] then
      move(row, 0, amount)
    elseif row.state == 'billed' then
      impression(row)
    end
    put_bid(row)
  end
end

for _, s in ipairs(a.settlements) do
  local id, kind, name, price, day, expires = s[1], s[2], s[3], s[4], s[6], s[7]
  local row = get_bid(id)
  if row == nil then
    row = {id = id, c = name, day = day, amount = 0, funded = false, state = 'open', price = 0, expires = expires,
           user = '', creative = ''}
  end
  local held = 0
  if row.funded and not FINAL[row.state] then held = row.amount end
  if kind == 'bill' then
    if row.state ~= 'billed' then
      local charge = price
      if row.state == 'expired' then charge = price - row.price end
      row.state, row.price = 'billed', price
      move(row, charge, -held)
      impression(row)
      put_bid(row)
    end
  elseif kind == 'win' then
    if row.state == 'open' then
      row.state, row.price = 'won', price
      put_bid(row)
    end
  elseif kind == 'loss' then
    if row.state == 'open' then
      row.state, row.price = 'lost', 0
      move(row, 0, -held)
      put_bid(row)
    end
  else
    return redis.error_reply('unknown notice kind ' .. tostring(kind))
  end
end

for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', string.format('%.17g', now), 'LIMIT', 0, limit)) do
  local row = get_bid(id)
  if row == nil then
    redis.call('ZREM', P .. 'due', id)
  elseif not FINAL[row.state] then
    local held, charge = 0, 0
    if row.funded then held = row.amount end
    if row.state == 'won' then charge = row.price end
    row.state, row.price = 'expired', charge
    move(row, charge, -held)
    put_bid(row)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'keep', '-inf', '(' .. string.format('%.17g', now),
                               'LIMIT', 0, limit)) do
  redis.call('DEL', P .. 'bid:' .. id)
  redis.call('ZREM', P .. 'keep', id)
end

local out = {}
for _, c in ipairs(a.campaigns) do
  local name, cday, total, daily, target = c[1], c[2], c[3], c[4], c[6]
  local lease, day = hold(name)
  if day ~= '' and day ~= cday and lease ~= 0 then
    add(name, day, 0, 0, -lease)
    add(name, cday, 0, 0, lease)
  end
  local ts, tr, tl = account(name, 'T')
  local ds, dr, dl = account(name, cday)
  local delta = target - lease
  if total >= 0 then delta = math.min(delta, total - ts - tr - tl) end
  if daily >= 0 then delta = math.min(delta, daily - ds - dr - dl) end
  if lease > 0 then delta = math.max(delta, -lease) else delta = math.max(delta, 0) end
  if delta > 0 then
    add(name, 'T', 0, 0, delta)
    add(name, cday, 0, 0, delta)
    lease = lease + delta
  end
  set_hold(name, lease, cday)  -- a lease taken back stays leased until the holder's next call (see book.py)
  ts, tr, tl = account(name, 'T')
  ds = account(name, cday)
  table.insert(out, name)
  table.insert(out, n(delta))
  table.insert(out, n(ts))
  table.insert(out, n(ds))
  table.insert(out, n(tr))
  table.insert(out, n(tl))
end
for _, k in ipairs(order) do
  for field, x in pairs(changes[k]) do
    if x ~= 0 then redis.call('HINCRBY', k, field, n(x)) end
  end
end
return out
"""


_IMPRESSIONS = r"""
local P, after, horizon, limit = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
while true do
  local oldest = redis.call('ZRANGE', P .. 'imps', 0, 0)
  if #oldest == 0 then break end
  local at = tonumber(string.match(oldest[1], '([^\t]*)$'))
  if at >= horizon then break end
  redis.call('ZREM', P .. 'imps', oldest[1])
end
return redis.call('ZRANGEBYSCORE', P .. 'imps', '(' .. after, '+inf', 'LIMIT', 0, limit)
"""


def connect(url: str):
    """A client of the Redis at ``url`` (``redis://HOST:PORT/DB``); ValueError naming the URL when it is not
    one. Short timeouts: a banker that does not answer must not hold the refresher for long."""
    try:
        import redis
    except ImportError:
        raise ValueError("--ledger redis://... needs the redis package: pip install 'bidder[redis]'") from None
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected a Redis URL such as redis://127.0.0.1:6379/0, got {url!r}")
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True)


class RedisBanker:
    """The banker of many machines: every holder's step is one Lua script in the Redis at ``url``."""

    def __init__(self, url: str, retention_s: float):
        self.url = url
        self.client = connect(url)
        self.retention_s = retention_s
        self._sync = self.client.register_script(_SYNC)
        self._impressions = self.client.register_script(_IMPRESSIONS)

    def __repr__(self) -> str:
        return f"RedisBanker({self.url!r})"

    def sync(self, holder: str, now: float, campaigns: Sequence[CampaignSync], reservations: Sequence[Reservation],
             settlements: Sequence[Settlement]) -> dict[str, Grant]:
        payload = json.dumps({"holder": holder, "now": now, "retention": self.retention_s, "limit": EXPIRE_BATCH,
                              "campaigns": campaigns, "reservations": reservations, "settlements": settlements})
        flat = self._sync(keys=[PREFIX], args=[payload])
        return {flat[i]: Grant(*(int(x) for x in flat[i + 1:i + 6])) for i in range(0, len(flat), 6)}

    def impressions(self, after: int, horizon: float, limit: int = 10_000) -> list[Impression]:
        """The billed impressions of users logged after ``after`` (a ``seq``), oldest first; the log loses what is
        older than ``horizon`` (the engine's time minus the longest frequency cap window)."""
        out = []
        for entry in self._impressions(keys=[PREFIX], args=[after, repr(horizon), limit]):
            seq, campaign, creative, user, at = entry.split("\t")
            out.append(Impression(int(seq), campaign, creative, user, float(at)))
        return out

    def accounts(self, campaign: str, day: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(spent, reserved, leased) of the campaign's total account and of its account for ``day``."""
        fields = [f"{period}:{x}" for period in (TOTAL, day) for x in "srl"]
        values = [int(v or 0) for v in self.client.hmget(PREFIX + "acct:" + campaign, fields)]
        return tuple(values[:3]), tuple(values[3:])

    def close(self) -> None:
        self.client.close()


class RedisNoticeStore:
    """``bidder.notice_store.NoticeStore`` in Redis: a key per (bid id, kind), set once, kept as long as a notice
    can still be accepted (``max_window_s`` plus a margin, on the engine's clock)."""

    def __init__(self, url: str, max_window_s: float, margin_s: float = 3600.0):
        self.client = connect(url)
        self.retention_s = max_window_s + margin_s

    def first_time(self, bid_id: str, kind: str, issued: float, now: float) -> bool:
        ttl = max(1, math.ceil(issued + self.retention_s - now))
        return bool(self.client.set(f"{NOTICE_PREFIX}{bid_id}:{kind}", 1, nx=True, ex=ttl))

    def first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> list[bool]:
        pipeline = self.client.pipeline(transaction=False)  # one round trip; each SET NX is atomic on its own
        for bid_id, kind, issued in notices:
            pipeline.set(f"{NOTICE_PREFIX}{bid_id}:{kind}", 1, nx=True,
                         ex=max(1, math.ceil(issued + self.retention_s - now)))
        return [bool(done) for done in pipeline.execute()]

    def try_first_times(self, notices: Sequence[tuple[str, str, float]], now: float) -> None:
        """Never at once: a round trip to Redis is made in the store's thread, off the event loop."""
        return None

    def close(self) -> None:
        self.client.close()
