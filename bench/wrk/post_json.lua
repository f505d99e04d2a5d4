-- POST one JSON body on every request and, when the run ends, print its figures as one JSON line.
--
-- Usage: wrk ... -s post_json.lua URL -- BODY_FILE
-- The figures: report.lua (beside this file).

dofile((debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./") .. "report.lua")

function init(args)
   local path = args[1]
   if path == nil then
      error("post_json.lua needs the body file: wrk ... -s post_json.lua URL -- BODY_FILE")
   end
   local file = assert(io.open(path, "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end
