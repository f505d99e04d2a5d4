-- Paced requests, for a fixed rate instead of as many as the server takes: each connection waits DELAY_MS
-- before each request (so its rate is 1000 / (DELAY_MS + latency) per second).
--
-- Usage: wrk ... -s paced.lua URL -- post BODY_FILE DELAY_MS     (POST one JSON body, as post_json.lua)
--        wrk ... -s paced.lua URL -- get PATHS_FILE DELAY_MS     (GET each path of the file in turn, one per line;
--                                                               each thread starts at its own place in the list)
-- The figures: report.lua (beside this file), as post_json.lua prints them.

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "report.lua")

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
