"""The context budget: which earlier segments the prompt of the next utterance keeps.

CSM speaks each utterance after a prompt of earlier segments (their text and Mimi codes) in one
context of C positions (the model's `max_pos`, 2048 for CSM-1B). A text token takes one position,
an audio frame one, and every segment with audio ends with one all-zero end frame; each frame the
model generates takes one more. Long text (`CSM.generate_long`) and dialogue (`CSM.converse`) grow
the conversation utterance by utterance, so they choose the prompt of each utterance (a "piece":
a sentence, or a turn) by one rule:

- The prompt is R + H + T: the references R (voice references, the caller's context; always kept,
  in order), then the kept history H (the most recent earlier pieces, oldest first), then the
  piece's own text rows T.
- The piece may generate up to F frames: its length cap (`max_audio_length_ms` rounded up to 80 ms
  frames); without a cap F = C - |R| - |T|, all the rest.
- H is the longest run of the most recent pieces (at most `history_limit` of them) with
  |R| + |H| + |T| + F <= C. Older pieces drop out first, whole; a piece that does not fit stops the
  run, so the history never has holes.
- |R| + |T| > C: the piece cannot be spoken at all: ValueError before anything is generated. When
  |R| + |T| + F > C the history is empty and the piece may stop early with "context_full".

So every prompt fits, the piece always has room for its cap, and no call fails because the
conversation so far grew too long.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .prompt import segment_rows


def keep_recent(context: int, fixed: int, history: Sequence[int], max_frames: int,
                history_limit: int | None = None) -> int:
    """How many of the most recent history pieces the prompt keeps (the rule above).

    context: C; fixed: |R| + |T|; history: positions of the earlier pieces, oldest first;
    max_frames: F, 0 = no cap; history_limit: at most this many pieces (None = no limit).
    """
    frames = max_frames if max_frames > 0 else context - fixed
    room = context - fixed - frames
    limit = len(history) if history_limit is None else min(history_limit, len(history))
    kept = used = 0
    while kept < limit and used + history[-1 - kept] <= room:
        used += history[-1 - kept]
        kept += 1
    return kept


class ContextBudget:
    """Builds the prompt of each piece of a growing conversation by the rule of this module.

    tokenizer: the model's; context: C; references: (speaker, text, codes) segments kept in every
    prompt; history_limit: as `keep_recent`; parse_special: as `GenerationOptions.parse_special`,
    for every segment's text.
    `add` a piece once it is generated, with a tag of the caller's; `prompt` gives the next one's
    prompt and the tags of the pieces it kept.
    """

    def __init__(self, tokenizer, context: int, references=(), history_limit: int | None = None,
                 parse_special: bool = True):
        self.tokenizer = tokenizer
        self.context = int(context)
        self.history_limit = history_limit
        self.parse_special = parse_special
        self._references = [self._rows(s, t, c) for s, t, c in references]
        self._fixed = sum(r.shape[0] for r in self._references)
        self._history: list[np.ndarray] = []
        self._tags: list = []

    def _rows(self, speaker: int, text: str, codes=None) -> np.ndarray:
        return segment_rows(self.tokenizer, speaker, text, codes, parse_special=self.parse_special)

    def check(self, speaker: int, text: str, what: str) -> None:
        """ValueError when `text` cannot be spoken even with no history (|R| + |T| > C)."""
        need = self._fixed + self._rows(speaker, text).shape[0]
        if need > self.context:
            refs = f" (voice references and context: {self._fixed})" if self._fixed else ""
            raise ValueError(f"{what} needs {need} prompt positions{refs} but the context holds {self.context}: "
                             "shorten it or the voice references")

    def prompt(self, speaker: int, text: str, max_frames: int) -> tuple[np.ndarray, list]:
        """(prompt rows, tags of the history pieces kept, oldest first) for the next piece."""
        own = self._rows(speaker, text)
        n = keep_recent(self.context, self._fixed + own.shape[0], [h.shape[0] for h in self._history],
                        max_frames, self.history_limit)
        start = len(self._history) - n
        prompt = np.concatenate(self._references + self._history[start:] + [own])
        return np.ascontiguousarray(prompt), self._tags[start:]

    def add(self, speaker: int, text: str, codes: np.ndarray, tag=None) -> None:
        """Append a generated piece to the history. A piece without frames is left out (it has no
        audio to show how the conversation sounds)."""
        if codes.shape[0]:
            self._history.append(self._rows(speaker, text, codes))
            self._tags.append(tag)
            # pieces beyond the most recent C positions can never be kept again: forget them
            total = sum(h.shape[0] for h in self._history)
            while total - self._history[0].shape[0] >= self.context:
                total -= self._history.pop(0).shape[0]
                self._tags.pop(0)
