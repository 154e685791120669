"""Prometheus text exposition of the server's counters (no client library needed)."""

from __future__ import annotations

import collections
import threading

TTFB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()   # (route, status) -> count
        self.audio_seconds = 0.0
        self.ttfb_sum = 0.0
        self.ttfb_count = 0
        self.ttfb_buckets = [0] * len(TTFB_BUCKETS)

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def first_byte(self, seconds: float) -> None:
        with self._lock:
            self.ttfb_sum += seconds
            self.ttfb_count += 1
            for i, b in enumerate(TTFB_BUCKETS):
                if seconds <= b:
                    self.ttfb_buckets[i] += 1

    def audio(self, seconds: float) -> None:
        with self._lock:
            self.audio_seconds += seconds

    def render(self, engine) -> str:
        with self._lock:
            lines = ["# HELP pycsm_requests_total HTTP requests by route and status.",
                     "# TYPE pycsm_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'pycsm_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# HELP pycsm_time_to_first_byte_seconds From a speech request's arrival to its first audio byte.",
                      "# TYPE pycsm_time_to_first_byte_seconds histogram"]
            for b, n in zip(TTFB_BUCKETS, self.ttfb_buckets):
                lines.append(f'pycsm_time_to_first_byte_seconds_bucket{{le="{b}"}} {n}')
            lines += [f'pycsm_time_to_first_byte_seconds_bucket{{le="+Inf"}} {self.ttfb_count}',
                      f"pycsm_time_to_first_byte_seconds_sum {self.ttfb_sum:.6f}",
                      f"pycsm_time_to_first_byte_seconds_count {self.ttfb_count}",
                      "# HELP pycsm_audio_seconds_total Seconds of audio sent.",
                      "# TYPE pycsm_audio_seconds_total counter",
                      f"pycsm_audio_seconds_total {self.audio_seconds:.3f}"]
        st = engine.stats
        lines += ["# HELP pycsm_frames_total Audio frames (80 ms) generated.",
                  "# TYPE pycsm_frames_total counter",
                  f"pycsm_frames_total {st.frames}",
                  "# HELP pycsm_engine_steps_total Steps of the continuous batch (each one frame of every running stream).",
                  "# TYPE pycsm_engine_steps_total counter",
                  f"pycsm_engine_steps_total {st.steps}",
                  "# HELP pycsm_engine_stream_frames_total Frames the steps made, summed over streams (divided by "
                  "the steps: how full the batch ran).",
                  "# TYPE pycsm_engine_stream_frames_total counter",
                  f"pycsm_engine_stream_frames_total {st.stream_frames}",
                  "# HELP pycsm_engine_seconds_total Seconds the engine thread spent generating (step) and "
                  "decoding audio (decode).",
                  "# TYPE pycsm_engine_seconds_total counter",
                  f'pycsm_engine_seconds_total{{phase="step"}} {st.step_seconds:.3f}',
                  f'pycsm_engine_seconds_total{{phase="decode"}} {st.decode_seconds:.3f}',
                  "# HELP pycsm_prompt_rows_reused_total Prompt rows taken from cached keys and values "
                  "(a voice an earlier request prefilled) instead of being prefilled.",
                  "# TYPE pycsm_prompt_rows_reused_total counter",
                  f"pycsm_prompt_rows_reused_total {st.rows_reused}",
                  "# HELP pycsm_frames_per_second Frames generated per second over the recent steps.",
                  "# TYPE pycsm_frames_per_second gauge",
                  f"pycsm_frames_per_second {st.frames_per_second():.3f}",
                  "# HELP pycsm_active_streams Streams in the batch (running or joining).",
                  "# TYPE pycsm_active_streams gauge",
                  f"pycsm_active_streams {engine.active_streams}",
                  "# HELP pycsm_queue_depth Requests waiting for a batch slot.",
                  "# TYPE pycsm_queue_depth gauge",
                  f"pycsm_queue_depth {engine.queue_depth}"]
        return "\n".join(lines) + "\n"
