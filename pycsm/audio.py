"""Audio results, files and resampling.

`Audio` is what `CSM.generate` returns: float32 mono samples at 24 kHz plus the Mimi codes they were
decoded from. Files are written through `soundfile` to a temporary name next to the target and renamed
into place when complete, so an error or Ctrl-C never leaves a partial file behind.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 24000

# suffix -> (soundfile format, subtype). WAV and FLAC hold 16-bit PCM written from Audio.to_int16(),
# so a saved file has exactly the samples of the raw s16le output; Ogg holds Vorbis.
FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}


def output_format(path: str | os.PathLike) -> tuple[str, str]:
    """(format, subtype) for a file name from its suffix; ValueError for an unknown suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise ValueError(f"unknown audio file type {suffix or '(no suffix)'!r} for {os.fspath(path)}: "
                         f"use one of {known}")
    return FORMATS[suffix]


def partial_path(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path` to write to before renaming into place (created by the
    writer, so it gets the usual permissions)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and scale to int16 (round to nearest)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.rint(x * 32767.0).astype(np.int16)


class AudioWriter:
    """Writes a sound file incrementally to a temporary name; renames it into place on success.

    >>> with AudioWriter("out.wav") as w:
    ...     w.write(chunk)          # float32 mono chunks
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE):
        import soundfile as sf

        self.path = Path(path)
        self.format, self.subtype = output_format(self.path)
        self.sample_rate = int(sample_rate)
        directory = self.path.parent
        if not directory.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {directory}")
        self._tmp = partial_path(self.path)
        self.frames = 0
        try:
            self._file = sf.SoundFile(os.fspath(self._tmp), mode="w", samplerate=self.sample_rate, channels=1,
                                      format=self.format, subtype=self.subtype)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def write(self, samples) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.subtype == "PCM_16":
            self._file.write(float_to_int16(samples))
        else:
            self._file.write(samples)
        self.frames += samples.shape[0]

    def commit(self) -> None:
        """Close the file and move it to its final name."""
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


@dataclass(eq=False)
class Audio:
    """Generated (or loaded) speech: float32 mono `samples` at `sample_rate` Hz.

    codes: the Mimi codes (frames x 32, int32) the samples were decoded from, or None. When present,
        using this Audio as voice context needs no re-encoding. For `CSM.generate_long` they are the
        sentences' codes one after another (the pauses between sentences have no codes).
    stop_reason: why generation ended: "eos" (the model ended the utterance), "max_length" (the
        `max_audio_length_ms` cap), "context_full" (the model's 2048-position context is full) or
        "aborted" (a callback stopped it); None for audio that was not generated.
    seed: the sampling seed used (handy when `seed=None` drew a random one), or None.
    """

    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE
    codes: np.ndarray | None = None
    stop_reason: str | None = None
    seed: int | None = None

    def __post_init__(self):
        s = np.asarray(self.samples, dtype=np.float32)
        if s.ndim != 1:
            raise ValueError(f"Audio samples must be 1-D (mono), got shape {s.shape}")
        self.samples = np.ascontiguousarray(s)
        if int(self.sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate!r}")
        self.sample_rate = int(self.sample_rate)
        if self.codes is not None:
            self.codes = np.ascontiguousarray(self.codes, dtype=np.int32)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.shape[0] / self.sample_rate

    def __len__(self) -> int:
        return self.samples.shape[0]

    def to_int16(self) -> np.ndarray:
        """Samples as int16 PCM (clipped to [-1, 1], scaled by 32767)."""
        return float_to_int16(self.samples)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a .wav (16-bit PCM), .flac (16-bit) or .ogg (Vorbis) file, chosen by the suffix.

        The file is written to a temporary name in the same folder and renamed when complete.
        Returns the path. ValueError for another suffix.
        """
        with AudioWriter(path, self.sample_rate) as w:
            w.write(self.samples)
        return Path(path)

    def __repr__(self) -> str:
        frames = None if self.codes is None else self.codes.shape[0]
        return (f"Audio({self.duration:.2f} s @ {self.sample_rate} Hz, frames={frames}, "
                f"stop_reason={self.stop_reason!r}, seed={self.seed!r})")


# ---------------------------------------------------------------------------------------------
# Reading and resampling
# ---------------------------------------------------------------------------------------------

def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a sound file as float32 mono at `sample_rate` (channels averaged, resampled).

    FileNotFoundError when it does not exist; ValueError when it cannot be decoded, is empty or holds
    NaN / infinite samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        data, rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.SoundFileError, OSError, ValueError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read audio file {path}: {detail}") from None
    mono = data.mean(axis=1, dtype=np.float64) if data.shape[1] > 1 else data[:, 0].astype(np.float64)
    check_samples(mono, f"audio file {path}")
    return resample(mono, int(rate), int(sample_rate)).astype(np.float32)


def check_samples(samples: np.ndarray, what: str = "audio") -> None:
    """ValueError for empty audio or NaN / infinite samples."""
    if samples.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{what} contains NaN or infinite samples")


def _kaiser_lowpass(up: int, down: int) -> np.ndarray:
    """The anti-aliasing filter of scipy.signal.resample_poly (Kaiser window, beta 5, 10 zero
    crossings of the narrower band each side), with gain `up` for the zero-stuffed input."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    n = np.arange(-half_len, half_len + 1, dtype=np.float64)
    cutoff = 1.0 / max_rate  # relative to Nyquist
    h = cutoff * np.sinc(cutoff * n) * np.kaiser(2 * half_len + 1, 5.0)
    return h / h.sum() * up


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling of a 1-D signal (the same filter and alignment as
    ``scipy.signal.resample_poly(x, up, down)`` with up/down = rate_out/rate_in reduced).

    Output length is ceil(len(x) * rate_out / rate_in). float64 in, float64 out.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    if up == down:
        return x.copy()
    h = _kaiser_lowpass(up, down)
    half_len = (h.shape[0] - 1) // 2
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    # Polyphase form: output m sits at t = m*down + half_len on the zero-stuffed (xup) grid and is
    # sum_k h[k] * xup[t - k]; only k = t - i*up (input i) contribute. Phase p = t % up uses taps
    # h[p], h[p + up], ... against inputs t//up, t//up - 1, ...
    n_taps = -(-h.shape[0] // up)
    taps = np.zeros(n_taps * up)
    taps[: h.shape[0]] = h
    poly = taps.reshape(n_taps, up).T  # poly[p, j] = h[p + j*up]
    base_max = ((n_out - 1) * down + half_len) // up
    pad_l, pad_r = n_taps, max(0, base_max - n_in + 1)
    xp = np.concatenate([np.zeros(pad_l), x, np.zeros(pad_r)])
    out = np.empty(n_out)
    step = max(1, (1 << 22) // n_taps)  # bound the gather to ~4M elements per block
    j = np.arange(n_taps)
    for start in range(0, n_out, step):
        m = np.arange(start, min(n_out, start + step))
        t = m * down + half_len
        base, phase = t // up, t % up
        vals = xp[(base + pad_l)[:, None] - j[None, :]]
        out[start:start + m.shape[0]] = np.einsum("ij,ij->i", poly[phase], vals)
    return out
