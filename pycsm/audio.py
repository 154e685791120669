"""Audio results and audio files: `Audio`, the file writers, and reading voice-context recordings.

`Audio` is what `CSM.generate` returns: float32 mono samples at 24 kHz plus the Mimi codes they were
decoded from. Files are written through `soundfile` (libsndfile) to a temporary name next to the
target and renamed into place when complete, so an error or Ctrl-C never leaves a partial file
behind. The path "-" is standard output: a WAV whose header declares an unknown length, written as
the audio comes (as sox and ffmpeg write WAV to a pipe). Resampling is `pycsm.resample` (libsoxr).
"""

from __future__ import annotations

import os
import secrets
import struct
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .resample import StreamResampler, check_rate, resample

SAMPLE_RATE = 24000
STDOUT = "-"

# suffix -> (soundfile format, subtype, libsndfile version that first writes it). WAV and FLAC hold
# 16-bit PCM written from Audio.to_int16(), so a saved file has exactly the samples of the raw s16le
# output; Ogg holds Vorbis, .opus Opus in Ogg, .mp3 MPEG layer III.
FORMATS = {
    ".wav": ("WAV", "PCM_16", "1.0"),
    ".flac": ("FLAC", "PCM_16", "1.0"),
    ".ogg": ("OGG", "VORBIS", "1.0"),
    ".opus": ("OGG", "OPUS", "1.0.29"),
    ".mp3": ("MP3", "MPEG_LAYER_III", "1.1.0"),
}
# the sample rates each codec can encode (None: any)
_RATES = {
    "OPUS": (8000, 12000, 16000, 24000, 48000),
    "MPEG_LAYER_III": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
}


def output_format(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> tuple[str, str]:
    """(format, subtype) for a file name from its suffix ("-": WAV on standard output).

    ValueError for an unknown suffix, a rate the codec cannot encode, or a format the installed
    libsndfile cannot write (naming the version it needs)."""
    if os.fspath(path) == STDOUT:
        return "WAV", "PCM_16"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown audio file type {suffix or '(no suffix)'!r} for {os.fspath(path)}: "
                         f"use one of {', '.join(FORMATS)}")
    fmt, subtype, needs = FORMATS[suffix]
    import soundfile as sf

    if not sf.check_format(fmt, subtype):
        raise ValueError(f"cannot write {suffix} files: they need libsndfile >= {needs} built with that codec, "
                         f"and soundfile here uses libsndfile {sf.__libsndfile_version__}")
    rates = _RATES.get(subtype)
    if rates is not None and sample_rate not in rates:
        raise ValueError(f"{suffix} cannot hold {sample_rate} Hz audio: use one of "
                         f"{', '.join(map(str, rates))} Hz (--sample-rate)")
    return fmt, subtype


def partial_path(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to `path` to write to before renaming into place (created by the
    writer, so it gets the usual permissions)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")


def check_writable(path: str | os.PathLike) -> None:
    """Raise OSError (FileNotFoundError, IsADirectoryError, PermissionError...) now, before any audio
    is made, when a file could not be written at `path`: its folder is missing, it is a directory,
    or creating a file there fails (read-only folder, /proc...). "-" (standard output) passes."""
    if os.fspath(path) == STDOUT:
        return
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {folder}")
    if path.is_dir():
        raise IsADirectoryError(f"output path is a directory: {path}")
    try:  # the writer creates a temporary file in that folder: try exactly that
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise type(e)(e.errno, f"cannot write to {folder}: {e.strerror or e}") from None


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and scale to int16 (round to nearest)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.rint(x * 32767.0).astype(np.int16)


def check_samples(samples: np.ndarray, what: str = "audio") -> None:
    """ValueError for empty audio or NaN / infinite samples."""
    if samples.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{what} contains NaN or infinite samples")


# The data size sox writes to a pipe and reads back as "unknown: up to the end of the stream"
# (libsndfile and Python's wave module clamp it to what the stream holds).
WAV_UNKNOWN_LENGTH = 0x7FFFF000


def wav_stream_header(sample_rate: int) -> bytes:
    """The 44-byte header of a 16-bit mono WAV of unknown length, as sox writes to a pipe."""
    return (b"RIFF" + struct.pack("<I", WAV_UNKNOWN_LENGTH + 36) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", WAV_UNKNOWN_LENGTH))


class AudioWriter:
    """Writes a sound file incrementally (24 kHz float32 chunks in, resampled to `out_rate` when it
    differs). A file goes to a temporary name and is renamed into place on success; "-" writes a
    WAV to standard output as the chunks come.

    >>> with AudioWriter("out.wav") as w:
    ...     w.write(chunk)          # float32 mono chunks
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, out_rate: int | None = None):
        self.sample_rate = int(sample_rate)
        self.out_rate = self.sample_rate if out_rate is None else check_rate(out_rate, "output sample rate")
        self._resampler = StreamResampler(self.sample_rate, self.out_rate) if self.out_rate != self.sample_rate \
            else None
        self.format, self.subtype = output_format(path, self.out_rate)
        self.frames = 0  # input samples written
        self._file = self._tmp = self._pipe = None
        if os.fspath(path) == STDOUT:
            self.path = None
            self._pipe = getattr(sys.stdout, "buffer", sys.stdout)
            self._pipe.write(wav_stream_header(self.out_rate))
            self._pipe.flush()
            return
        import soundfile as sf

        self.path = Path(path)
        check_writable(self.path)
        self._tmp = partial_path(self.path)
        try:
            self._file = sf.SoundFile(os.fspath(self._tmp), mode="w", samplerate=self.out_rate, channels=1,
                                      format=self.format, subtype=self.subtype)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def write(self, samples) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            check_samples(samples, "the audio to write")
        self.frames += samples.shape[0]
        self._put(samples if self._resampler is None else self._resampler(samples))

    def _put(self, samples: np.ndarray) -> None:
        if self._pipe is not None:
            self._pipe.write(float_to_int16(samples).astype("<i2").tobytes())
            self._pipe.flush()
        elif self.subtype == "PCM_16":
            self._file.write(float_to_int16(samples))
        else:
            self._file.write(samples)

    def commit(self) -> None:
        """Write what the resampler holds back, close the file and move it to its final name."""
        if self._resampler is not None:
            self._put(self._resampler(np.zeros(0, dtype=np.float32), last=True))
        if self._pipe is not None:
            return
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file (standard output: stop writing)."""
        if self._pipe is not None:
            return
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
        self.sample_rate = check_rate(self.sample_rate, "Audio sample_rate")
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

    def resample(self, sample_rate: int) -> "Audio":
        """This audio at another rate (libsoxr); codes, stop_reason and seed are kept (the same speech)."""
        rate = check_rate(sample_rate)
        return replace(self, samples=resample(self.samples, self.sample_rate, rate), sample_rate=rate)

    def save(self, path: str | os.PathLike, sample_rate: int | None = None) -> Path | None:
        """Write a .wav / .flac (16-bit PCM), .ogg (Vorbis), .opus or .mp3 file, chosen by the suffix,
        at `sample_rate` Hz (None: this audio's rate); "-" writes a WAV to standard output.

        The file is written to a temporary name in the same folder and renamed when complete.
        Returns the path (None for "-"). ValueError for another suffix, a format this libsndfile
        cannot write, or NaN / infinite samples (nothing is written).
        """
        if self.samples.size:
            check_samples(self.samples, "the audio to save")
        with AudioWriter(path, self.sample_rate, sample_rate) as w:
            w.write(self.samples)
        return w.path

    def __repr__(self) -> str:
        frames = None if self.codes is None else self.codes.shape[0]
        return (f"Audio({self.duration:.2f} s @ {self.sample_rate} Hz, frames={frames}, "
                f"stop_reason={self.stop_reason!r}, seed={self.seed!r})")


# ---------------------------------------------------------------------------------------------
# Reading voice-context recordings
# ---------------------------------------------------------------------------------------------

# The longest recording read as voice context: what the published model's context holds (2048
# positions of 80 ms frames). A CSM checks the encoded length against its own context again.
MAX_READ_SECONDS = 2048 * 0.08


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
               max_seconds: float = MAX_READ_SECONDS) -> np.ndarray:
    """Read a sound file as float32 mono at `sample_rate` (channels averaged, resampled).

    The header's rate and length are checked before the samples are read: ValueError for a rate
    outside [1000, 768000] Hz or more than `max_seconds` of audio. FileNotFoundError when the file
    does not exist; ValueError when it cannot be decoded, is empty or holds NaN / infinite samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        with sf.SoundFile(os.fspath(path)) as f:
            rate = check_rate(f.samplerate, f"the sample rate of {path}")
            if f.frames > max_seconds * rate:
                raise ValueError(f"audio file {path} holds {f.frames / rate:.1f} s; at most {max_seconds:g} s "
                                 "fit the model's context")
            data = f.read(dtype="float32", always_2d=True)
    except (RuntimeError, sf.SoundFileError, OSError) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read audio file {path}: {detail}") from None
    mono = data.mean(axis=1, dtype=np.float64) if data.shape[1] > 1 else data[:, 0]
    check_samples(mono, f"audio file {path}")
    return resample(mono, rate, int(sample_rate))
