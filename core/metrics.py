"""What `/metrics` counts of ended jobs, kept in Redis so every process adds to one total.

Workers, the reconciler and the API each end jobs; Prometheus scrapes the API. Each ending adds
to Redis hashes under `<namespace>:metrics:*` (one pipeline per group of jobs), and the API's
`/metrics` (api/prometheus.py) reads them back as counters and histograms, next to what it
reads live (queue depths, jobs queued and running, worker heartbeats).

- `metrics:ended`     field `variant|status|code` → jobs that ended so
- `metrics:submitted` field `variant` → jobs accepted by the API
- `metrics:tokens`    field `variant|input` / `variant|output` → tokens used
- `metrics:filtered`  field `stage|category` → inputs refused and outputs withheld by the content
  filter; `metrics:filtered:HOUR` field `user|stage`, the same by the hour, for the summary
- `metrics:hist:NAME` fields `variant|i` (observations in bucket i, not cumulative; i = len(bounds)
  is +Inf), `variant|sum`, `variant|count`
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any

from core.keys import filtered_key
from core.settings import Settings

SEP = "|"  # variant names are [a-z0-9.-]; statuses and codes are words


@dataclass(frozen=True)
class Histogram:
    name: str  # the Prometheus name
    help: str
    field: str  # the job_metrics value it observes
    scale: float  # multiplies the value into the histogram's unit
    bounds: tuple[float, ...]


HISTOGRAMS = (
    Histogram(
        "gemmaq_job_duration_seconds",
        "From submission to the end of the job (queue wait + load + inference).",
        "total_ms",
        1e-3,
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    ),
    Histogram(
        "gemmaq_queue_wait_seconds",
        "From submission until a worker took the job.",
        "queue_ms",
        1e-3,
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    ),
    Histogram(
        "gemmaq_time_to_first_token_seconds",
        "From the job's start on the worker to its first generated token.",
        "time_to_first_token_ms",
        1e-3,
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    ),
    Histogram(
        "gemmaq_job_tokens_per_second",
        "Each job's output tokens over its inference time.",
        "tokens_per_second",
        1.0,
        (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
    ),
    Histogram(
        "gemmaq_batch_size",
        "The largest batch each job ran in.",
        "batch_size",
        1.0,
        (1, 2, 4, 8, 16, 32, 64, 128, 256),
    ),
)


FILTERED_HOURS_KEPT = 32 * 24  # longer than the summary's longest window


def add_filtered(pipe: Any, settings: Settings, user_id: str, stage: str, category: str) -> None:
    """Queue, on a Redis pipeline (sync or async), the counts of one input refused or one output
    withheld by the content filter."""
    hour = int(time.time() // 3600)
    pipe.hincrby(filtered_key(settings), f"{stage}{SEP}{category}", 1)
    pipe.hincrby(filtered_key(settings, hour), f"{user_id}{SEP}{stage}", 1)
    pipe.expire(filtered_key(settings, hour), FILTERED_HOURS_KEPT * 3600)


# One script for all that a group of job ends adds (one command and one round trip, however many
# jobs and histograms; db/endings.py builds its arguments): KEYS = ended, tokens, the histograms'
# hashes, then each job's event stream; ARGV = histograms, events TTL, stream cap, jobs, then per
# job: variant, status, code, input and output tokens, and per histogram its bucket ('' when not
# observed) and value.
RECORD_ENDED = """
local histograms, ttl, cap, jobs = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local a = 5
for j = 1, jobs do
  local variant, status, code = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local input, output = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  a = a + 5
  redis.call('HINCRBY', KEYS[1], variant .. '|' .. status .. '|' .. code, 1)
  if input > 0 then redis.call('HINCRBY', KEYS[2], variant .. '|input', input) end
  if output > 0 then redis.call('HINCRBY', KEYS[2], variant .. '|output', output) end
  for h = 1, histograms do
    local bucket, value = ARGV[a], ARGV[a + 1]
    a = a + 2
    if bucket ~= '' then
      redis.call('HINCRBY', KEYS[2 + h], variant .. '|' .. bucket, 1)
      redis.call('HINCRBYFLOAT', KEYS[2 + h], variant .. '|sum', value)
      redis.call('HINCRBY', KEYS[2 + h], variant .. '|count', 1)
    end
  end
  local stream = KEYS[2 + histograms + j]
  redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'event', 'status', 'data', ARGV[a])
  redis.call('EXPIRE', stream, ttl)
  a = a + 1
end
return jobs
"""


def bucket_of(histogram: Histogram, value: Any) -> list[str | int | float]:
    """RECORD_ENDED's two arguments for one histogram: the bucket a value falls in (the first
    bound ≥ it) and the value, scaled; ('', 0) when not observed."""
    if value is None:
        return ["", 0]
    scaled = float(value) * histogram.scale
    return [bisect.bisect_left(histogram.bounds, scaled), scaled]


def split(field: bytes | str) -> list[str]:
    return (field.decode() if isinstance(field, bytes) else field).split(SEP)
