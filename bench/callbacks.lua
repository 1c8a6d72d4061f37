-- wrk script: POST pre-generated, distinct, signed WeCom callbacks; optionally at a fixed rate.
-- wrk -t T -c C -d D -s bench/callbacks.lua http://127.0.0.1:PORT -- FILE FIRST COUNT RATE T
--   FILE   one request per line: "<path?query>\t<body>"
--   FIRST  first line to use (0-based), COUNT lines available from there
--   RATE   requests per second for all threads together; 0 = as fast as the server answers
--   T      the thread count again (init() cannot see it otherwise)
-- Each thread takes every T-th line, so no request is sent twice; a thread that runs out stops.
-- done() prints one JSON line that bench/run.py reads.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local timespec = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, timespec) -- CLOCK_MONOTONIC
  return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file, first, count, rate = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  local step = tonumber(args[5] or 1)
  local index = tonumber(wrk.thread:get("thread_index") or 0)
  requests = {}
  local line_no = 0
  for line in io.lines(file) do
    if line_no >= first and line_no < first + count and (line_no - first) % step == index then
      local tab = line:find("\t", 1, true)
      requests[#requests + 1] = wrk.format("POST", line:sub(1, tab - 1),
        { ["Content-Type"] = "text/xml" }, line:sub(tab + 1))
    end
    line_no = line_no + 1
  end
  position = 0
  interval = rate > 0 and 1000.0 * step / rate or 0 -- ms between this thread's sends
  next_at = nil
  ran_out = 0
end

function request()
  position = position + 1
  if position > #requests then
    ran_out = 1
    wrk.thread:stop()
    position = #requests -- wrk still wants a request; it is never sent once stopped
  end
  return requests[position]
end

function delay()
  if interval == 0 then return 0 end
  local now = now_ms()
  if next_at == nil or next_at < now - 1000 then next_at = now end -- never burst to catch up
  next_at = next_at + interval
  local wait = next_at - now
  return wait > 0 and wait or 0
end

function done(summary, latency, requests_)
  local exhausted = 0
  for _, thread in ipairs(threads) do
    exhausted = exhausted + (thread:get("ran_out") or 0)
  end
  io.write(string.format(
    '{"requests": %d, "seconds": %.6f, "non2xx": %d, "errors": %d, "p50_ms": %.3f, "p90_ms": %.3f, ' ..
    '"p99_ms": %.3f, "max_ms": %.3f, "exhausted_threads": %d}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, exhausted))
end
