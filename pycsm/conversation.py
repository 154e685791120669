"""Conversations: a multi-speaker dialogue spoken turn by turn with a rolling context.

`CSM.converse(turns, voices)` / `CSM.stream_converse(...)` delegate here. CSM sounds natural when
each utterance is generated after the earlier ones (their text and audio codes), as Sesame's demo
does with two speakers. The rules:

- Speakers. A turn's speaker is an id (an int in 0..2**31-1, used as it is) or a name (str). Names
  get the smallest ids that no int speaker of the conversation uses, in order of first appearance.
- Voices. `voices` maps a speaker (id or name) to a reference: a `Voice` or a `Segment` (its text
  and audio; its own speaker id is ignored). The reference is spoken under the dialogue speaker's
  id. Every prompt starts with the references of all speakers, in order of their ids.
- Pieces. A turn is split into sentences like `CSM.generate_long` (`pycsm.text.split_sentences`);
  each sentence is a piece, joined within the turn by `pause_ms` of silence; turns are joined by
  `gap_ms`. Piece k of the conversation (counting from 0 over all turns) uses seed + k.
- Context. Each piece's prompt is chosen by the context budget (`pycsm.budget`): the references,
  then the most recent earlier pieces (text and codes) that fit beside the piece's own text and its
  length cap `max_audio_length_ms` (default 10 s per piece, as Sesame's demo), oldest dropped first.
  A piece generated with `context=<the references and the pieces kept>` and `seed=seed + k` by
  `CSM.generate` gives the same codes.
- Options. `options` / keywords as for `CSM.generate` (`GenerationOptions`); without `options`
  the dialogue defaults apply: the 10 s cap, and plain text (`parse_special=False`: "<|end_of_text|>"
  in a script is spoken as characters, not read as a special token that would start another
  segment as another speaker).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._native import CSM_N_CODEBOOKS
from .api import _SEED_MASK, _STOP_RANK, AudioStream, Segment, _check_chunk, _check_text, _is_int
from .audio import Audio
from .options import GenerationOptions
from .text import DEFAULT_MAX_CHARS, split_sentences
from .voices import Voice

DEFAULT_TURN_MS = 10_000  # length cap of one piece: Sesame's demo caps a turn at 10 s
DEFAULT_GAP_MS = 300      # silence between turns
MAX_SPEAKER_ID = 2**31 - 1
# the options of a dialogue without `options=`: the 10 s cap, and plain text (scripts are bulk text)
DIALOGUE_OPTIONS = GenerationOptions(max_audio_length_ms=DEFAULT_TURN_MS, parse_special=False)


class TurnError(ValueError):
    """A turn that cannot be spoken (it does not fit the context even alone with the voice
    references); `turn` is its 0-based index. Raised before anything is generated."""

    def __init__(self, turn: int, message: str):
        super().__init__(message)
        self.turn = turn


class DialogueChunk(NamedTuple):
    """One chunk of `CSM.stream_converse`: float32 samples of turn `turn` (0-based), said by `speaker`
    (as given in the turns). gap: the silence between turns, before turn `turn`."""

    turn: int
    speaker: object
    samples: np.ndarray
    gap: bool = False


@dataclass(eq=False)
class Piece:
    """One generated piece of a conversation: a turn, or one sentence of a long turn.

    index: k (it used seed + k); turn: the turn it belongs to; speaker: the dialogue speaker id;
    context: indices of the earlier pieces its prompt kept, oldest first; n_prompt: its prompt
    positions (references + kept pieces + its own text).
    """

    index: int
    turn: int
    speaker: int
    text: str
    seed: int
    context: tuple
    n_prompt: int
    codes: np.ndarray
    stop_reason: str


@dataclass(eq=False)
class Conversation:
    """What `CSM.converse` returns.

    audio: the whole conversation (turns joined by the gap; codes: every piece's, in order).
    turns: one Audio per turn spoken (sentence pauses included; seed: its first piece's).
    pieces: every generated piece (see `Piece`); speakers: each speaker as given -> its id.
    """

    audio: Audio
    turns: list
    pieces: list
    speakers: dict

    @property
    def stop_reason(self) -> str:
        return self.audio.stop_reason


class ConversationStream(AudioStream):
    """Iterator of `DialogueChunk` from `CSM.stream_converse`. `pieces` fills as pieces end;
    `codes` / `stop_reason` describe the whole conversation once it has ended."""

    def __init__(self, body, sample_rate: int, seed: int, speakers: dict):
        super().__init__(body, sample_rate, seed)
        self.speakers = speakers

    @property
    def pieces(self) -> list:
        return self._result.setdefault("pieces", [])

    def __next__(self) -> DialogueChunk:
        return next(self._it)


# ---------------------------------------------------------------------------------------------
# Turns, speakers, voices
# ---------------------------------------------------------------------------------------------

def _speaker_key(speaker, what: str):
    if _is_int(speaker) and 0 <= speaker <= MAX_SPEAKER_ID:
        return int(speaker)
    if isinstance(speaker, str) and speaker.strip():
        return speaker.strip()
    raise ValueError(f"{what}: the speaker must be an id (int in 0..{MAX_SPEAKER_ID}) or a name (non-empty str), "
                     f"got {speaker!r}")


def normalize_turns(turns) -> list[tuple[object, str]]:
    """(speaker, text) of each turn given as a (speaker, text) pair, a dict with "speaker" and "text",
    or an object with `speaker` and `text` attributes (a text-only `Segment`)."""
    if isinstance(turns, (str, bytes, Mapping, Segment)):
        raise TypeError("turns must be a sequence of (speaker, text) pairs, dicts or Segments")
    out = []
    for i, turn in enumerate(turns):
        what = f"turn {i + 1}"
        if isinstance(turn, Mapping):
            extra = set(turn) - {"speaker", "text"}
            if extra or "speaker" not in turn or "text" not in turn:
                raise ValueError(f"{what}: a dict turn has exactly the keys 'speaker' and 'text', got {sorted(turn)}")
            speaker, text = turn["speaker"], turn["text"]
        elif isinstance(turn, tuple) and len(turn) == 2:
            speaker, text = turn
        elif hasattr(turn, "speaker") and hasattr(turn, "text"):
            if isinstance(turn, Segment) and turn.audio is not None:
                raise ValueError(f"{what} has audio: pass recorded speech as a voice (voices=) instead")
            speaker, text = turn.speaker, turn.text
        else:
            raise TypeError(f"{what}: expected a (speaker, text) pair, a dict or a Segment, "
                            f"not {type(turn).__name__}")
        out.append((_speaker_key(speaker, what), _check_text(text, f"the text of {what}")))
    return out


def number_speakers(keys) -> dict:
    """Speaker (id or name) -> dialogue id: ids stay; names get the smallest ids not taken, in order."""
    ids = {k: k for k in keys if isinstance(k, int)}
    taken = set(ids.values())
    free = 0
    for k in keys:
        if k not in ids:
            while free in taken:
                free += 1
            ids[k] = free
            taken.add(free)
    return ids


def _reference(voice, what: str) -> Segment:
    if isinstance(voice, Voice):
        return voice.segment()
    if isinstance(voice, Segment):
        return voice
    raise TypeError(f"{what}: a voice must be a Voice or a Segment (its text and audio), not {type(voice).__name__}")


def _check_ms(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def stream_converse(tts, turns, voices=None, options: GenerationOptions | None = None, *,
                    gap_ms: float = DEFAULT_GAP_MS, pause_ms: float = 150, progress=None,
                    max_chars: int = DEFAULT_MAX_CHARS, chunk_frames: int | None = 4, on_frame=None,
                    **option_kw) -> ConversationStream:
    """See `CSM.stream_converse`."""
    spoken = normalize_turns(turns)
    if not spoken:
        raise ValueError("no turns to speak")
    speakers = number_speakers([k for k, _ in spoken])
    voices = {} if voices is None else voices
    if not isinstance(voices, Mapping):
        raise TypeError(f"voices must map speakers to voices, not {type(voices).__name__}")
    refs = {}
    for key, voice in voices.items():
        k = _speaker_key(key, f"voices[{key!r}]")
        if k not in speakers:
            raise ValueError(f"voices[{key!r}]: no turn is spoken by {k!r}")
        refs[speakers[k]] = _reference(voice, f"voices[{key!r}]")
    opts, native = tts._request(DIALOGUE_OPTIONS if options is None else options, option_kw)
    gap = np.zeros(int(round(_check_ms(gap_ms, "gap_ms", 0, 60_000) * tts.sample_rate / 1000)), np.float32)
    pause = np.zeros(int(round(_check_ms(pause_ms, "pause_ms", 0, 60_000) * tts.sample_rate / 1000)), np.float32)
    if chunk_frames is not None:
        chunk_frames = _check_chunk(chunk_frames)
    seed = opts.seed
    plan = [(key, speakers[key], split_sentences(text, max_chars) or [text]) for key, text in spoken]

    def body(result: dict):
        pieces = result.setdefault("pieces", [])
        reasons = []
        with tts._locked():
            try:
                references = [Segment(sid, refs[sid].text, refs[sid]._resolve(tts._encode)[2]) for sid in sorted(refs)]
                budget = tts._budget(references, opts.parse_special)
                for t, (_key, sid, sentences) in enumerate(plan):  # before any work: each must fit
                    for j, sentence in enumerate(sentences):
                        where = f"turn {t + 1}" + (f", sentence {j + 1}," if len(sentences) > 1 else "")
                        try:
                            budget.check(sid, sentence, where)
                        except ValueError as e:
                            raise TurnError(t, str(e)) from None
                if progress is not None and progress(0, len(plan)) is False:
                    reasons.append("aborted")
                    return
                for t, (key, sid, sentences) in enumerate(plan):
                    if t and gap.size:
                        yield DialogueChunk(t, key, gap, True)
                    for j, sentence in enumerate(sentences):
                        if j and pause.size:
                            yield DialogueChunk(t, key, pause)
                        k = len(pieces)
                        prompt, kept = budget.prompt(sid, sentence, native["max_frames"])
                        p_seed = (seed + k) & _SEED_MASK
                        if chunk_frames is None:
                            codes, reason = tts._run(prompt, native, p_seed, on_frame)
                            yield DialogueChunk(t, key, tts._decode(codes))
                        else:
                            out = {}
                            for chunk in tts._stream_chunks(prompt, native, p_seed, chunk_frames, out, on_frame):
                                yield DialogueChunk(t, key, chunk)
                            codes, reason = out["codes"], out["stop_reason"]
                        pieces.append(Piece(k, t, sid, sentence, p_seed, tuple(kept), prompt.shape[0], codes, reason))
                        reasons.append(reason)
                        budget.add(sid, sentence, codes, tag=k)
                    if progress is not None and progress(t + 1, len(plan)) is False and t + 1 < len(plan):
                        reasons.append("aborted")
                        return
            finally:
                result["codes"] = np.concatenate([p.codes for p in pieces]) if pieces else \
                    np.zeros((0, CSM_N_CODEBOOKS), dtype=np.int32)
                result["stop_reason"] = min(reasons, key=_STOP_RANK.index) if reasons else "aborted"

    return ConversationStream(body, tts.sample_rate, seed, speakers)


def converse(tts, turns, voices=None, options: GenerationOptions | None = None, **kw) -> Conversation:
    """See `CSM.converse`."""
    st = stream_converse(tts, turns, voices, options, chunk_frames=None, **kw)
    joined, by_turn = [], {}
    with st:
        for chunk in st:
            joined.append(chunk.samples)
            if not chunk.gap:
                by_turn.setdefault(chunk.turn, []).append(chunk.samples)
    turns_audio = []
    for t, parts in sorted(by_turn.items()):
        ps = [p for p in st.pieces if p.turn == t]
        if not ps:  # stopped between this turn's pause and its next piece
            break
        turns_audio.append(Audio(np.concatenate(parts), tts.sample_rate,
                                 codes=np.concatenate([p.codes for p in ps]),
                                 stop_reason=min((p.stop_reason for p in ps), key=_STOP_RANK.index),
                                 seed=ps[0].seed))
    samples = np.concatenate(joined) if joined else np.zeros(0, dtype=np.float32)
    audio = Audio(samples, tts.sample_rate, codes=st.codes, stop_reason=st.stop_reason, seed=st.seed)
    return Conversation(audio, turns_audio, list(st.pieces), dict(st.speakers))
