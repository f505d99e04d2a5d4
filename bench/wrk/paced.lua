-- Paced requests, for a fixed rate instead of as many as the server takes. PACE is either
--   DELAY_MS   each connection waits DELAY_MS before each request (its rate is 1000 / (DELAY_MS + latency) a second:
--              a slower server gets fewer requests), or
--   rate=R     a schedule of R requests a second per wrk thread, whatever the latencies: each request takes the next
--              slot of the thread's schedule and waits for it (wrk waits in whole milliseconds; the schedule keeps
--              the fractions, so the rate holds), is sent at once when its slot has passed, and the schedule starts
--              again from now when it falls over a second behind (every connection busy that long).
--
-- Usage: wrk ... -s paced.lua URL -- post BODY_FILE PACE     (POST one JSON body, as post_json.lua)
--        wrk ... -s paced.lua URL -- get PATHS_FILE PACE     (GET each path of the file in turn, one per line;
--                                                           each thread starts at its own place in the list)
-- The figures: report.lua (beside this file), as post_json.lua prints them.

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "report.lua")

local paths = nil
local next_path = 1
local pause = 0
local interval = nil  -- seconds between two slots of the schedule (rate=R)
local due = nil       -- the next slot, on the monotonic clock
local clock = nil

local function monotonic()
   clock.clock_gettime(1, clock.now)  -- CLOCK_MONOTONIC
   return tonumber(clock.now.tv_sec) + tonumber(clock.now.tv_nsec) * 1e-9
end

function init(args)
   local mode, path, pace = args[1], args[2], args[3] or ""
   local rate = tonumber(pace:match("^rate=(.+)$") or "")
   if (mode ~= "post" and mode ~= "get") or path == nil or (rate == nil and tonumber(pace) == nil)
      or (rate ~= nil and rate <= 0) then
      error("paced.lua needs: post BODY_FILE PACE | get PATHS_FILE PACE, PACE being DELAY_MS or rate=R (R > 0)")
   end
   if rate ~= nil then
      local ffi = require("ffi")  -- wrk runs LuaJIT: clock_gettime through its FFI
      ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } paced_timespec; int clock_gettime(int, paced_timespec *); ]]
      clock = {clock_gettime = ffi.C.clock_gettime, now = ffi.new("paced_timespec")}
      interval = 1.0 / rate
   else
      pause = tonumber(pace)
   end
   local file = assert(io.open(path, "rb"))
   if mode == "post" then
      wrk.body = file:read("*a")
      wrk.method = "POST"
      wrk.headers["Content-Type"] = "application/json"
   else
      paths = {}
      for line in file:lines() do
         if line ~= "" then table.insert(paths, line) end
      end
      if #paths == 0 then error("paced.lua: no paths in " .. path) end
      next_path = (id * 7919) % #paths + 1
   end
   file:close()
end

function delay()
   if interval == nil then
      return pause
   end
   local now = monotonic()
   if due == nil or due < now - 1.0 then
      due = now
   end
   local wait = due - now
   due = due + interval
   return wait > 0 and math.floor(wait * 1000) or 0
end

function request()
   if paths == nil then
      return wrk.format()
   end
   local path = paths[next_path]
   next_path = next_path % #paths + 1
   return wrk.format("GET", path)
end
