-- POST one JSON body with a new request id on every request: "<thread>-<n>" in place of the body's marker, so
-- that every bid has its own bid id (a ledger, a notice store or an event log that keys by it sees distinct rows).
-- Costs wrk a Lua call per request: `bench load --distinct-ids` uses it for every server of the run alike.
--
-- Usage: wrk ... -s post_ids.lua URL -- BODY_FILE MARKER   (BODY_FILE holds "MARKER" exactly once, as a string)
-- The figures: report.lua (beside this file).

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "report.lua")

local head, tail = nil, nil
local count = 0

function init(args)
   local path, marker = args[1], args[2]
   if path == nil or marker == nil then
      error("post_ids.lua needs the body file and its marker: wrk ... -s post_ids.lua URL -- BODY_FILE MARKER")
   end
   local file = assert(io.open(path, "rb"))
   local body = file:read("*a")
   file:close()
   local first, last = body:find('"' .. marker .. '"', 1, true)
   if first == nil then
      error("post_ids.lua: the marker " .. marker .. " is not in " .. path)
   end
   head, tail = body:sub(1, first) .. (id or 0) .. "-", body:sub(last)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   count = count + 1
   return wrk.format(nil, nil, nil, head .. count .. tail)
end
