"""The 33-column prompt layout of CSM (see csm.h): rows of 32 audio codes + 1 text token, -1 = absent.

Layout, as Sesame's generator builds it: for each context segment, its text rows
(<|begin_of_text|> "[speaker]text" <|end_of_text|>), its audio frames, then one all-zero frame (the
end-of-audio frame); then the text rows of the segment to speak.
"""

from __future__ import annotations

import numpy as np

from ._native import CSM_N_CODEBOOKS, CSM_N_COLUMNS, CSM_TEXT_COLUMN


def text_rows(ids) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int32).reshape(-1)
    rows = np.full((len(ids), CSM_N_COLUMNS), -1, dtype=np.int32)
    rows[:, CSM_TEXT_COLUMN] = ids
    return rows


def audio_rows(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != CSM_N_CODEBOOKS:
        raise ValueError(f"audio codes must have shape (frames, {CSM_N_CODEBOOKS}), got {codes.shape}")
    rows = np.full((codes.shape[0], CSM_N_COLUMNS), -1, dtype=np.int32)
    rows[:, :CSM_N_CODEBOOKS] = codes
    return rows


def segment_rows(tokenizer, speaker: int, text: str, codes=None, *, parse_special: bool = True) -> np.ndarray:
    """Rows of one segment: its text, then (when codes are given) its frames and the all-zero end frame.

    parse_special=False reads special-token text in `text` (``<|end_of_text|>``...) as plain
    characters, so that it cannot end the segment or start another speaker's.
    """
    parts = [text_rows(tokenizer.encode_segment(text, speaker, parse_special=parse_special))]
    if codes is not None:
        codes = np.asarray(codes, dtype=np.int32)
        parts.append(audio_rows(codes))
        parts.append(audio_rows(np.zeros((1, CSM_N_CODEBOOKS), dtype=np.int32)))
    return np.concatenate(parts, axis=0)


def build_prompt(tokenizer, text: str, speaker: int, context=(), *, parse_special: bool = True) -> np.ndarray:
    """Prompt rows for speaking `text` as `speaker` after the context segments.

    context: iterable of (speaker, text, codes) with codes an int array (frames, 32) or None.
    parse_special: True (the reference's behaviour) turns special-token text in the texts into those
    tokens; pass False for text from users, files or the network (it is then spoken as written).
    """
    parts = [segment_rows(tokenizer, s, t, c, parse_special=parse_special) for (s, t, c) in context]
    parts.append(segment_rows(tokenizer, speaker, text, parse_special=parse_special))
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.int32)
