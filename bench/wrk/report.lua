-- What post_json.lua and paced.lua share: the status counts and the one "WRK_JSON {...}" line done() prints.
-- wrk's own summary rounds latency to two digits and has no P90/P99.9; the histogram it keeps has
-- microsecond resolution, so done() reads the percentiles from it directly.  The line starts with
-- "WRK_JSON " so the caller can find it among wrk's usual output.

-- Percentiles printed for the table (P50..P99.9) and for the latency plot (the tail in detail).
local PERCENTILES = {0, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9,
                     99.95, 99.99, 99.999}

-- One table per thread (each wrk thread has its own Lua state); done() collects them through setup().
statuses = {}
local threads = {}

local thread_count = 0

function setup(thread)
   thread:set("id", thread_count)  -- a thread's number, for scripts that spread threads over their data
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

-- wrk counts only status > 399 as errors, so a bidder answering 204 (no bid) would look healthy;
-- counting every status keeps the bid / no-bid mix visible.
function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local function number(x)
   -- %.17g keeps integers exact and fractions round-trippable; JSON has no inf/nan.
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
