"""Audio encoders for the server's response formats: float32 chunks in, bytes out as they are ready.

A streamed response cannot go back to patch its header once it is sent, so streamed files carry the
header a live stream has: WAV with the "unknown length" sizes (0xFFFFFFFF, as OpenAI's streamed
WAV), FLAC with total samples 0 ("unknown" in the FLAC format), MP3 at a constant bit rate (its
first frame's VBR tag stays blank: a silent frame; readers take the length from the file size), Ogg
Opus as is. A response that is not streamed is encoded whole, headers complete.
"""

from __future__ import annotations

import struct

import numpy as np
import soundfile as sf

# response_format -> (libsndfile format, subtype, extra SoundFile arguments); pcm and wav are written here
_SNDFILE = {
    "flac": ("FLAC", "PCM_16", {}),
    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.5}),
    "opus": ("OGG", "OPUS", {}),
}
FORMATS = ("mp3", "opus", "flac", "wav", "pcm")
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "flac": "audio/flac", "wav": "audio/wav",
               "pcm": "audio/pcm"}  # pcm: 16-bit signed little-endian mono at the model's rate


def to_int16(samples: np.ndarray) -> bytes:
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return (np.round(x * 32767.0)).astype("<i2").tobytes()


def wav_header(sample_rate: int, n_samples: int | None) -> bytes:
    """16-bit mono WAV header; n_samples None: the streamed form with unknown sizes."""
    data = 0xFFFFFFFF if n_samples is None else 2 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16) +
            b"data" + struct.pack("<I", data))


class _Sink:
    """A file for libsndfile that hands out what was written. Bytes already handed out are frozen:
    libsndfile's closing header rewrites land only on bytes not yet taken."""

    def __init__(self):
        self.buf = bytearray()
        self.pos = 0
        self.taken = 0

    def write(self, data) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > len(self.buf):
            self.buf.extend(b"\0" * (end - len(self.buf)))
        lo = max(self.pos, self.taken)
        if lo < end:
            self.buf[lo:end] = data[lo - self.pos:]
        self.pos = end
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, len(self.buf))[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:  # libsndfile never reads a file it writes from scratch
        return b""

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self.buf[self.taken:])
        self.taken = len(self.buf)
        return out


class Encoder:
    """Encodes one response. streaming: write() returns the bytes ready now; else everything comes
    from close()."""

    def __init__(self, fmt: str, sample_rate: int, streaming: bool):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt, self.sample_rate, self.streaming = fmt, sample_rate, streaming
        self._pcm: list[bytes] = []
        self._n = 0
        self._started = False
        self._sink = self._file = None
        if fmt in _SNDFILE:
            major, subtype, extra = _SNDFILE[fmt]
            self._sink = _Sink()
            self._file = sf.SoundFile(self._sink, "w", sample_rate, 1, subtype, format=major, **extra)

    def write(self, samples: np.ndarray) -> bytes:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._file is not None:
            self._file.write(samples)
            return self._sink.take() if self.streaming else b""
        data = to_int16(samples)
        self._n += samples.size
        if not self.streaming:
            self._pcm.append(data)
            return b""
        if self.fmt == "wav" and not self._started:
            data = wav_header(self.sample_rate, None) + data
        self._started = True
        return data

    def close(self) -> bytes:
        if self._file is not None:
            self._file.close()
            return self._sink.take()
        if self.streaming:
            return wav_header(self.sample_rate, None) if self.fmt == "wav" and not self._started else b""
        body = b"".join(self._pcm)
        return wav_header(self.sample_rate, self._n) + body if self.fmt == "wav" else body
