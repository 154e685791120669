"""Saved voices: a reference recording encoded once with Mimi, kept with its transcript and speaker.

>>> with pycsm.CSM("csm-1b-q8_0.gguf") as tts:
...     voice = pycsm.Voice.from_file("ref.wav", "What ref.wav says.", speaker=0, tts=tts)
...     voice.save("alice.csmvoice")                    # or save_voice(voice, "alice")
...     tts.generate("Hello again.", context=voice)     # speaks as the voice's speaker
>>> pycsm.Voice.load("alice.csmvoice")

A voice holds Mimi codes, not samples, so using it costs no encoding. The codes depend only on the
Mimi codec (32 codebooks of 2048 codes at 12.5 frames/s), which every CSM-1B file shares: a voice
made with one quantisation (f16, q8_0, q4_k) works with the others.

The ``.csmvoice`` file (version 1), all integers little-endian:

    offset 0   8 bytes  magic b"CSMVOICE"
    offset 8   u16      format version (1)
    offset 10  u32      n: length of the header
    offset 14  n bytes  header: a UTF-8 JSON object
                        {"speaker": int, "text": str, "frames": int, "codebooks": 32,
                         "codebook_size": 2048, "frame_rate": 12.5, "model": str}
                        ("model" names the file the codes were made with; information only)
    then       frames * codebooks u16 codes, frame-major

The file is exactly that long; anything else (another magic or version, a bad header, codes out of
range, a short or long file) is refused with one `VoiceFileError` line. No pickle is involved.

Named voices live in one folder per user (`voices_dir()`: ``PYCSM_VOICES``, else the platform's
user data folder, e.g. ``~/.local/share/pycsm/voices``), as ``NAME.csmvoice``.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._native import CSM_N_CODEBOOKS

MAGIC = b"CSMVOICE"
VERSION = 1
SUFFIX = ".csmvoice"
CODEBOOK_SIZE = 2048
FRAME_RATE = 12.5
MAX_FRAMES = 65536          # the largest context a CSM file may declare
MAX_HEADER_BYTES = 1 << 20  # a transcript of up to ~1 MB; more cannot be spoken as context anyway
_PREFIX = struct.Struct("<8sHI")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class VoiceFileError(ValueError):
    """A .csmvoice file that cannot be read (one line naming the file and what is wrong)."""


def _check_codes(codes) -> np.ndarray:
    c = np.asarray(codes)
    if c.dtype.kind not in "iu" or c.ndim != 2 or c.shape[1] != CSM_N_CODEBOOKS:
        raise ValueError(f"voice codes must be an integer array of shape (frames, {CSM_N_CODEBOOKS}), "
                         f"got {c.dtype} {c.shape}")
    if not 1 <= c.shape[0] <= MAX_FRAMES:
        raise ValueError(f"a voice holds 1 to {MAX_FRAMES} frames, got {c.shape[0]}")
    if c.min() < 0 or c.max() >= CODEBOOK_SIZE:
        raise ValueError(f"voice codes must be in [0, {CODEBOOK_SIZE})")
    return np.ascontiguousarray(c, dtype=np.int32)


@dataclass(frozen=True, eq=False)
class Voice:
    """A speaker's reference: `speaker` id, the `text` said, its Mimi `codes` (frames, 32).

    Accepted wherever `context=` is (alone, or among `Segment`s); a call without `speaker=` then
    speaks as this voice's speaker. `model`: the model file the codes were made with (information).
    """

    speaker: int
    text: str
    codes: np.ndarray
    model: str = ""

    def __post_init__(self):
        if not isinstance(self.speaker, numbers.Integral) or isinstance(self.speaker, bool) or self.speaker < 0:
            raise ValueError(f"speaker must be an integer >= 0, got {self.speaker!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("a voice needs the transcript of its recording (text)")
        object.__setattr__(self, "speaker", int(self.speaker))
        object.__setattr__(self, "codes", _check_codes(self.codes))
        if not isinstance(self.model, str):
            raise TypeError(f"model must be str, not {type(self.model).__name__}")

    @property
    def duration(self) -> float:
        """Seconds of reference audio."""
        return self.codes.shape[0] / FRAME_RATE

    def segment(self):
        """This voice as a context `Segment`."""
        from .api import Segment

        return Segment(self.speaker, self.text, self.codes)

    @classmethod
    def from_file(cls, audio: str | os.PathLike, text: str, speaker: int = 0, *, tts) -> "Voice":
        """Encode a recording (any rate and channel count) with the Mimi encoder of `tts` (a `CSM`).
        Its length is checked against what the model's context holds before any work."""
        from .audio import read_audio

        samples = read_audio(audio, tts.sample_rate, max_seconds=tts.max_context_seconds)
        return cls(speaker, text, tts.encode(samples), model=tts.path.name)

    # ------------------------------------------------------------------ file

    def to_bytes(self) -> bytes:
        header = json.dumps({"speaker": self.speaker, "text": self.text, "frames": int(self.codes.shape[0]),
                             "codebooks": CSM_N_CODEBOOKS, "codebook_size": CODEBOOK_SIZE,
                             "frame_rate": FRAME_RATE, "model": self.model},
                            ensure_ascii=False).encode("utf-8")
        if len(header) > MAX_HEADER_BYTES:
            raise ValueError(f"the voice's transcript is too long ({len(header)} bytes; at most {MAX_HEADER_BYTES})")
        return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + self.codes.astype("<u2").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "voice data") -> "Voice":
        """Parse a .csmvoice image; VoiceFileError (naming `what`) when it is not a valid one."""
        def bad(why: str):
            return VoiceFileError(f"{what} is not a valid .csmvoice file: {why}")

        if len(data) < _PREFIX.size:
            raise bad(f"{len(data)} bytes is shorter than its fixed header")
        magic, version, n = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise bad("wrong magic bytes")
        if version != VERSION:
            raise bad(f"format version {version}; this pycsm reads version {VERSION}")
        if n > MAX_HEADER_BYTES or _PREFIX.size + n > len(data):
            raise bad(f"header length {n} is out of range")
        try:
            head = json.loads(data[_PREFIX.size:_PREFIX.size + n].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not UTF-8 JSON ({e})") from None
        if not isinstance(head, dict):
            raise bad("header is not a JSON object")
        frames = head.get("frames")
        if head.get("codebooks") != CSM_N_CODEBOOKS or head.get("codebook_size") != CODEBOOK_SIZE:
            raise bad(f"made for a codec of {head.get('codebooks')!r} codebooks of {head.get('codebook_size')!r} "
                      f"codes; CSM-1B's Mimi has {CSM_N_CODEBOOKS} of {CODEBOOK_SIZE}")
        if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= MAX_FRAMES:
            raise bad(f"frame count {frames!r} is out of range [1, {MAX_FRAMES}]")
        expected = _PREFIX.size + n + frames * CSM_N_CODEBOOKS * 2
        if len(data) != expected:
            raise bad(f"{len(data)} bytes where its header promises {expected} (truncated or padded)")
        codes = np.frombuffer(data, dtype="<u2", offset=_PREFIX.size + n).reshape(frames, CSM_N_CODEBOOKS)
        try:
            return cls(head.get("speaker"), head.get("text"), codes, model=head.get("model", ""))
        except (TypeError, ValueError) as e:
            raise bad(str(e)) from None

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write the voice to `path` (a temporary name in the same folder, renamed when complete).
        overwrite=False: FileExistsError when `path` exists."""
        from .audio import partial_path

        path = Path(path)
        data = self.to_bytes()
        if not overwrite and path.exists():
            raise FileExistsError(f"voice file already exists: {path}")
        tmp = partial_path(path)
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if a file of that name appeared meanwhile
        except FileExistsError:
            raise FileExistsError(f"voice file already exists: {path}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Voice":
        """Read a .csmvoice file. FileNotFoundError when missing; VoiceFileError when invalid."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"voice file not found: {path}")
        size = path.stat().st_size
        limit = _PREFIX.size + MAX_HEADER_BYTES + MAX_FRAMES * CSM_N_CODEBOOKS * 2
        if size > limit:
            raise VoiceFileError(f"{path} is not a valid .csmvoice file: {size} bytes is more than a voice holds")
        return cls.from_bytes(path.read_bytes(), str(path))

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"Voice(speaker={self.speaker}, {self.duration:.2f} s, text={text!r})"


# ---------------------------------------------------------------------------------------------
# The per-user voices folder
# ---------------------------------------------------------------------------------------------

def voices_dir() -> Path:
    """Where named voices are kept: $PYCSM_VOICES, else the user data folder's pycsm/voices."""
    env = os.environ.get("PYCSM_VOICES")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return platformdirs.user_data_path("pycsm", appauthor=False) / "voices"


def check_name(name: str) -> str:
    """A voice name: 1-64 of letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(SUFFIX):
        raise ValueError(f"invalid voice name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting "
                         "with a letter or digit")
    return name


def voice_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Where voice NAME is kept (in `folder`, default `voices_dir()`)."""
    return Path(folder or voices_dir()) / f"{check_name(name)}{SUFFIX}"


def save_voice(voice: Voice, name: str, overwrite: bool = False, folder: str | os.PathLike | None = None) -> Path:
    """Store `voice` as NAME in the voices folder (created if needed)."""
    path = voice_path(name, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    return voice.save(path, overwrite=overwrite)


def list_voices(folder: str | os.PathLike | None = None) -> list[str]:
    """The names of the stored voices, sorted."""
    folder = Path(folder or voices_dir())
    if not folder.is_dir():
        return []
    names = (p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}"))
    return sorted(n for n in names if _NAME.fullmatch(n))


def remove_voice(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Delete a stored voice; FileNotFoundError naming the folder when there is none of that name."""
    path = voice_path(name, folder)
    try:
        path.unlink()
    except FileNotFoundError:
        raise FileNotFoundError(f"no voice named {name!r} in {path.parent}") from None
    return path


def is_voice_file(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a file rather than a stored voice: it ends in .csmvoice or holds a path
    separator."""
    s = os.fspath(spec)
    return s.endswith(SUFFIX) or os.sep in s or bool(os.altsep and os.altsep in s)


def find_voice(spec: str | os.PathLike, folder: str | os.PathLike | None = None) -> Voice:
    """A voice by name (in the voices folder) or by path (see `is_voice_file`)."""
    if is_voice_file(spec):
        return Voice.load(spec)
    path = voice_path(os.fspath(spec), folder)
    if not path.is_file():
        raise FileNotFoundError(f"no voice named {os.fspath(spec)!r} in {path.parent} (`pycsm voice list` shows "
                                "them; `pycsm voice create` makes one)")
    return Voice.load(path)
