"""The package's one resampler: libsoxr (the `soxr` package), for output rates (`--sample-rate`,
`Audio.resample`) and for voice-context input of any rate alike.

Rates are bounded (`MIN_RATE`..`MAX_RATE`) before any work: a file header can declare any rate, and
a 1 Hz or 2**31 Hz header would otherwise make the resampler allocate minutes of audio or fail with
a MemoryError.
"""

from __future__ import annotations

import numbers

import numpy as np

MIN_RATE = 1000     # Hz; below it nothing speech-like survives
MAX_RATE = 768_000  # Hz; the highest rate audio hardware records at
QUALITY = "HQ"      # soxr's high quality: 20-bit precision, passband to 91 % of Nyquist


def check_rate(rate, what: str = "sample rate") -> int:
    """`rate` as an int; ValueError when it is not an integer in [MIN_RATE, MAX_RATE]."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"{what} must be an integer in [{MIN_RATE}, {MAX_RATE}] Hz, got {rate!r}")
    return int(rate)


def resample(x, rate_in: int, rate_out: int) -> np.ndarray:
    """Resample a 1-D signal from `rate_in` to `rate_out` Hz (float32 out; a copy when the rates are
    equal). Output length: len(x) * rate_out / rate_in rounded to the nearest integer, halves up."""
    import soxr

    rate_in, rate_out = check_rate(rate_in, "input sample rate"), check_rate(rate_out, "output sample rate")
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    if rate_in == rate_out:
        return x.copy()
    return np.asarray(soxr.resample(x, rate_in, rate_out, quality=QUALITY), dtype=np.float32)


class StreamResampler:
    """Chunk by chunk resampling; the chunks joined equal `resample` of the whole signal."""

    def __init__(self, rate_in: int, rate_out: int):
        import soxr

        self._rs = soxr.ResampleStream(check_rate(rate_in, "input sample rate"),
                                       check_rate(rate_out, "output sample rate"), 1, dtype="float32",
                                       quality=QUALITY)

    def __call__(self, chunk, last: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(chunk, dtype=np.float32).reshape(-1))
        return self._rs.resample_chunk(x, last=last)
