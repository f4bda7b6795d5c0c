-- wrk script: POST /search?k=10 with multipart uploads of real query images, round-robin.
--
--   wrk -t1 -c1 -d20s -s bench/wrk_search.lua http://127.0.0.1:8000 -- img1.jpg img2.jpg ...
--
-- Each wrk thread reads the images once (init), then cycles through them, each thread starting at a
-- different image. done() prints one line "WRK_JSON {...}" with counts, latency percentiles (ms),
-- the latency at every half percent (so that bench/run.py can merge several runs' latencies) and the
-- HTTP status counts, which bench/run.py parses.

local boundary = "----imgsearch-bench-7d1b0c"
local requests_ = {}
local next_ = 1
statuses = {}  -- global: done() reads it from every thread

local threads = {}
local counter = 0

function setup(thread)
   thread:set("thread_id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local data = f:read("*a")
   f:close()
   return data
end

function init(args)
   if #args == 0 then
      error("give the image files after --")
   end
   for _, path in ipairs(args) do
      local body = "--" .. boundary .. "\r\n"
         .. 'Content-Disposition: form-data; name="file"; filename="query.jpg"\r\n'
         .. "Content-Type: application/octet-stream\r\n\r\n"
         .. read_file(path) .. "\r\n--" .. boundary .. "--\r\n"
      local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
      table.insert(requests_, wrk.format("POST", "/search?k=10", headers, body))
   end
   next_ = ((thread_id or 0) * 7) % #requests_ + 1
end

function request()
   local r = requests_[next_]
   next_ = next_ % #requests_ + 1
   return r
end

function response(status, headers, body)
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
   local merged = {}
   for _, thread in ipairs(threads) do
      local s = thread:get("statuses")
      for code, n in pairs(s or {}) do
         merged[code] = (merged[code] or 0) + n
      end
   end
   local parts = {}
   for code, n in pairs(merged) do
      table.insert(parts, string.format('"%s": %d', code, n))
   end
   local quantiles = {}
   for i = 1, 199 do
      table.insert(quantiles, string.format("%.3f", latency:percentile(i / 2) / 1e3))
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_s": %.3f, "rps": %.3f, '
         .. '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f, '
         .. '"socket_errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, '
         .. '"non_2xx_3xx": %d, "statuses": {%s}, "quantiles_ms": [%s]}\n',
      summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
      latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
      latency.max / 1e3, latency.mean / 1e3,
      e.connect, e.read, e.write, e.timeout, e.status, table.concat(parts, ", "),
      table.concat(quantiles, ", ")))
end
