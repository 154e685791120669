"""Which voice a request's `voice` names: a saved voice, a speaker id, or a name --voice-map maps to
either.

Saved voices are pycsm.Voice files (.csmvoice: Mimi codes, transcript, speaker) in a folder (`pycsm
voice create` makes them; the server reads the folder on each request, so new voices need no
restart). A saved voice is spoken as its speaker with its recording as context: the same timbre on
every request. A bare speaker id ("0", "1") has no fixed timbre: with no voice context CSM picks a
new voice for every request (the seed decides which). OpenAI's voice names (alloy, ...) mean
nothing to CSM; --voice-map gives them a saved voice or a speaker id (`alloy=narrator,echo=1`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..voices import SUFFIX, Voice, VoiceFileError, check_name

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
MAX_SPEAKER = 9  # speaker ids "0".."9"


class VoiceError(ValueError):
    """An unknown or unreadable voice (the message says what this server offers)."""


def parse_voice_map(text: str | None) -> dict[str, str]:
    """`alloy=narrator,echo=1` -> {"alloy": "narrator", "echo": "1"}; ValueError on a malformed entry."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"--voice-map entries are NAME=VOICE, got {item!r}")
        out[name.strip()] = target.strip()
    return out


def _speaker(name: str) -> int | None:
    if name.isascii() and name.isdigit() and len(name) == 1 and int(name) <= MAX_SPEAKER:
        return int(name)
    return None


class Voices:
    """The voices a server offers: speaker ids, the saved voices of `folder` and the names of its
    voice map."""

    def __init__(self, folder: str | os.PathLike | None = None, voice_map: dict[str, str] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.voice_map = dict(voice_map or {})
        self._cache: dict[str, tuple[int, Voice]] = {}  # name -> (file mtime_ns, voice)
        for name, target in self.voice_map.items():
            if _speaker(target) is None:
                try:
                    check_name(target)
                except ValueError as e:
                    raise ValueError(f"--voice-map {name}={target}: not a speaker id 0..{MAX_SPEAKER} "
                                     f"nor a voice name ({e})") from None

    def saved(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        names = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            try:
                names.append(check_name(p.name[: -len(SUFFIX)]))
            except ValueError:
                continue
        return sorted(names)

    def names(self) -> list[dict]:
        """The list /v1/audio/voices returns."""
        out = [{"id": str(s), "name": str(s), "kind": "speaker"} for s in range(2)]
        out += [{"id": n, "name": n, "kind": "saved"} for n in self.saved()]
        out += [{"id": n, "name": n, "kind": "mapped", "voice": t} for n, t in sorted(self.voice_map.items())]
        return out

    def _load(self, name: str) -> Voice | None:
        if self.folder is None:
            return None
        path = self.folder / f"{name}{SUFFIX}"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        hit = self._cache.get(name)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            voice = Voice.load(path)
        except (OSError, VoiceFileError) as e:
            raise VoiceError(f"voice {name!r} cannot be read: {e}") from None
        self._cache[name] = (mtime, voice)
        return voice

    def resolve(self, voice: str) -> tuple[int, list]:
        """(speaker id, context segments as (speaker, text, codes)) for a request's voice name."""
        if not isinstance(voice, str) or not voice:
            raise VoiceError("voice must be a non-empty string (or an object with an id)")
        target = self.voice_map.get(voice, voice)
        speaker = _speaker(target)
        if speaker is not None:
            return speaker, []
        try:
            saved = self._load(check_name(target))
        except ValueError as e:
            if isinstance(e, VoiceError):
                raise
            saved = None
        if saved is not None:
            return saved.speaker, [(saved.speaker, saved.text, saved.codes)]
        hint = " (map OpenAI's voice names with --voice-map, e.g. alloy=0)" if voice in OPENAI_VOICES else ""
        offered = ", ".join(v["id"] for v in self.names())
        raise VoiceError(f"unknown voice {voice!r}{hint}; this server offers speaker ids 0..{MAX_SPEAKER} and: "
                         f"{offered}")
