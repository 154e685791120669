"""Dialogue scripts for `pycsm dialogue`: one turn per line.

    # a comment; blank lines are skipped
    Ann = voices/ann.npz        <- header: a name's voice (or `Ann = 0`: a speaker id, no voice)
    Bob = 1
    Ann: Did you see the sky this morning?
    Bob: I did.
    0: A speaker id needs no mapping.
    {"speaker": "Cy", "text": "A JSON line.", "voice": "voices/cy.npz"}

A turn is `SPEAKER: text` (SPEAKER an id such as `0`, or a name) or a JSON object with "speaker",
"text" and optionally "voice". A name must be mapped: by a header line (`NAME = VOICE` or
`NAME = ID`, before the first turn), by a JSON line's "voice", or by the caller (`--voice`).
The text is plain: special-token text in it is spoken, not parsed. Every problem is a
`ScriptError` naming the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .conversation import MAX_SPEAKER_ID

_HEADER = re.compile(r"^([^:=]+?)\s*=\s*(.*)$")  # an '=' before any ':'
_TURN = re.compile(r"^([^:]+?)\s*:(.*)$")


class ScriptError(ValueError):
    """A bad dialogue script; the message names the line."""


@dataclass
class Script:
    """turns: (speaker, text, line number), speaker an id or a mapped name; voices: speaker (id or
    name) -> (voice spec, line number) from header and JSON lines; ids: name -> id from headers."""

    turns: list = field(default_factory=list)
    voices: dict = field(default_factory=dict)
    ids: dict = field(default_factory=dict)


def _speaker(token, line: int):
    """An id (int, or a str of digits) or a name."""
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise ScriptError(f"line {line}: the speaker must be an id or a name, got {token!r}")
    if isinstance(token, str):
        token = token.strip()
        if not token:
            raise ScriptError(f"line {line}: the speaker is empty")
        if not token.isdecimal():
            return token
        if len(token) > 10:
            raise ScriptError(f"line {line}: speaker id {token} is out of range (0..{MAX_SPEAKER_ID})")
        token = int(token)
    if not 0 <= token <= MAX_SPEAKER_ID:
        raise ScriptError(f"line {line}: speaker id {token} is out of range (0..{MAX_SPEAKER_ID})")
    return token


def _set_voice(script: Script, speaker, spec, line: int) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise ScriptError(f"line {line}: the voice must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if speaker in script.voices and script.voices[speaker][0] != spec:
        raise ScriptError(f"line {line}: speaker {speaker} already has the voice {script.voices[speaker][0]!r} "
                          f"(line {script.voices[speaker][1]})")
    script.voices[speaker] = (spec, line)


def _json_turn(script: Script, text: str, line: int) -> None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScriptError(f"line {line}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ScriptError(f"line {line}: a JSON line must be an object")
    extra = set(obj) - {"speaker", "text", "voice"}
    if extra:
        raise ScriptError(f"line {line}: unknown key(s) {', '.join(sorted(extra))} (known: speaker, text, voice)")
    if "speaker" not in obj or "text" not in obj:
        raise ScriptError(f"line {line}: a JSON turn needs \"speaker\" and \"text\"")
    speaker = _speaker(obj["speaker"], line)
    if not isinstance(obj["text"], str):
        raise ScriptError(f"line {line}: \"text\" must be a string")
    if obj.get("voice") is not None:
        _set_voice(script, speaker, obj["voice"], line)
    script.turns.append((speaker, obj["text"], line))


def parse_script(text: str, mapped=()) -> Script:
    """Parse a script. mapped: names the caller maps (e.g. by `--voice`), which need no header.

    ScriptError for a malformed line, an empty turn, a header after the first turn, a name mapped
    twice, a name nobody mapped, or a script without turns.
    """
    script = Script()
    header_lines = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            _json_turn(script, line, n)
        elif (m := _HEADER.match(line)) is not None:
            if script.turns:
                raise ScriptError(f"line {n}: a speaker mapping ('NAME = VOICE' or 'NAME = ID') must come "
                                  "before the first turn")
            name, value = _speaker(m.group(1), n), m.group(2).strip()
            if not isinstance(name, str):
                raise ScriptError(f"line {n}: map a name, not the speaker id {name}")
            if name in header_lines:
                raise ScriptError(f"line {n}: {name} is already mapped (line {header_lines[name]})")
            header_lines[name] = n
            if not value:
                raise ScriptError(f"line {n}: nothing after '=' (give a voice or a speaker id)")
            if value.isdecimal():
                script.ids[name] = _speaker(value, n)
            else:
                _set_voice(script, name, value, n)
        elif (m := _TURN.match(line)) is not None:
            script.turns.append((_speaker(m.group(1), n), m.group(2), n))
        else:
            raise ScriptError(f"line {n}: expected 'SPEAKER: text', 'NAME = VOICE' or a JSON object")
    if not script.turns:
        raise ScriptError("the script has no turns")
    known = set(script.ids) | set(script.voices) | set(mapped)
    for speaker, words, n in script.turns:
        if not words.strip():
            raise ScriptError(f"line {n}: empty turn")
        if isinstance(speaker, str) and speaker not in known:
            raise ScriptError(f"line {n}: unknown speaker {speaker!r} (map it: a header line '{speaker} = VOICE' "
                              f"or '{speaker} = ID', or --voice {speaker}=VOICE)")
    return script
