-- Paced requests, for a fixed rate instead of as many as the server takes: each connection waits DELAY_MS
-- before each request (so its rate is 1000 / (DELAY_MS + latency) per second).
--
-- Usage: wrk ... -s paced.lua URL -- post BODY_FILE DELAY_MS     (POST one JSON body, as post_json.lua)
--        wrk ... -s paced.lua URL -- get PATHS_FILE DELAY_MS     (GET each path of the file in turn, one per line;
--                                                               each thread starts at its own place in the list)
-- done() prints the same "WRK_JSON {...}" line as post_json.lua.

local PERCENTILES = {0, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9,
                     99.95, 99.99, 99.999}

statuses = {}
local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local paths = nil
local next_path = 1
local pause = 0

function init(args)
   local mode, path, ms = args[1], args[2], tonumber(args[3])
   if (mode ~= "post" and mode ~= "get") or path == nil or ms == nil then
      error("paced.lua needs: post BODY_FILE DELAY_MS | get PATHS_FILE DELAY_MS")
   end
   pause = ms
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
   return pause
end

function request()
   if paths == nil then
      return wrk.format()
   end
   local path = paths[next_path]
   next_path = next_path % #paths + 1
   return wrk.format("GET", path)
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function number(x)
   if x ~= x or x == math.huge or x == -math.huge then
      return "null"
   end
   return string.format("%.17g", x)
end

function done(summary, latency, requests)
   local merged = {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("statuses")
      if counts then
         for status, count in pairs(counts) do
            merged[status] = (merged[status] or 0) + count
         end
      end
   end
   local status_parts = {}
   for status, count in pairs(merged) do
      table.insert(status_parts, string.format('"%d": %d', status, count))
   end
   local percentile_parts = {}
   for _, p in ipairs(PERCENTILES) do
      table.insert(percentile_parts, string.format("[%.10g, %s]", p, number(latency:percentile(p))))
   end
   local errors = summary.errors
   io.write("WRK_JSON {",
      '"duration_us": ', number(summary.duration), ", ",
      '"requests": ', number(summary.requests), ", ",
      '"bytes": ', number(summary.bytes), ", ",
      '"errors": {"connect": ', number(errors.connect), ', "read": ', number(errors.read),
      ', "write": ', number(errors.write), ', "status": ', number(errors.status),
      ', "timeout": ', number(errors.timeout), "}, ",
      '"latency_us": {"min": ', number(latency.min), ', "max": ', number(latency.max),
      ', "mean": ', number(latency.mean), ', "stdev": ', number(latency.stdev), "}, ",
      '"percentiles_us": [', table.concat(percentile_parts, ", "), "], ",
      '"statuses": {', table.concat(status_parts, ", "), "}",
      "}\n")
end
