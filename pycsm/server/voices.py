"""Which voice a request's `voice` names: a speaker id, or a name mapped by --voice-map.

A bare speaker id ("0", "1") has no fixed timbre: with no voice context CSM picks a new voice for
every request (the seed decides which). OpenAI's voice names (alloy, ...) mean nothing to CSM;
--voice-map gives them a speaker id (`alloy=0`).
"""

from __future__ import annotations

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
MAX_SPEAKER = 9  # speaker ids "0".."9"


class VoiceError(ValueError):
    """An unknown voice (the message lists what this server offers)."""


def parse_voice_map(text: str | None) -> dict[str, str]:
    """`alloy=0,echo=1` -> {"alloy": "0", "echo": "1"}; ValueError on a malformed entry."""
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
    if name.isascii() and name.isdigit() and int(name) <= MAX_SPEAKER:
        return int(name)
    return None


class Voices:
    """The voices a server offers: speaker ids and the names of its voice map."""

    def __init__(self, voice_map: dict[str, str] | None = None):
        self.voice_map = dict(voice_map or {})
        for name, target in self.voice_map.items():
            if _speaker(target) is None:
                raise ValueError(f"--voice-map {name}={target}: {target!r} is not a speaker id 0..{MAX_SPEAKER}")

    def names(self) -> list[dict]:
        """The list /v1/audio/voices returns."""
        out = [{"id": str(s), "name": str(s), "kind": "speaker"} for s in range(2)]
        out += [{"id": n, "name": n, "kind": "mapped", "voice": t} for n, t in sorted(self.voice_map.items())]
        return out

    def resolve(self, voice) -> tuple[int, list]:
        """(speaker id, context segments as (speaker, text, codes)) for a request's voice: a string or
        OpenAI's {"id": ...} object."""
        if isinstance(voice, dict):
            voice = voice.get("id")
        if not isinstance(voice, str) or not voice:
            raise VoiceError("voice must be a non-empty string (or an object with an id)")
        target = self.voice_map.get(voice, voice)
        speaker = _speaker(target)
        if speaker is not None:
            return speaker, []
        hint = " (map OpenAI's voice names with --voice-map, e.g. alloy=0)" if voice in OPENAI_VOICES else ""
        offered = ", ".join(v["id"] for v in self.names())
        raise VoiceError(f"unknown voice {voice!r}{hint}; this server offers speaker ids 0..{MAX_SPEAKER} and: {offered}")
