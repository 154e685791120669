"""Splitting long text into sentences for `CSM.generate_long`.

CSM speaks best one sentence at a time (an utterance of a few seconds, with the previous sentence as
context). `split_sentences` cuts at sentence ends (. ! ? … and runs of them such as "?!" or "...")
and at line breaks, keeps abbreviations ("Mr.", "Dr.", "e.g.", "U.S.", "No. 5"), initials ("J. R. R.
Tolkien") and decimals ("3.14") intact, and splits a sentence longer than `max_chars` at a comma,
semicolon, colon or dash, else at a space, else anywhere.
"""

from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 300

# Abbreviations that are (nearly) never the end of a sentence: titles and Latin short forms.
ABBREVIATIONS = frozenset("""
    mr mrs ms mx dr prof sr jr st mt ft vs cf approx dept est gen gov sen rep capt col lt sgt cmdr
    adm maj rev hon pres supt messrs mme mlle
""".split())
# Abbreviations that precede a number: "No. 5", "Vol. 2", "p. 12", "Fig. 3".
NUMBER_ABBREVIATIONS = frozenset("no nos vol vols fig figs p pp ch sec art op ed eq eqs".split())

_CLOSERS = "\"'”’)]}»"
# a run of sentence-ending marks, then closing quotes/brackets, then whitespace (or the end)
_BOUNDARY = re.compile(r"([.!?…]+)([" + re.escape(_CLOSERS) + r"]*)(?=\s|$)")
_SPACE = re.compile(r"\s+")
_SPACED_ELLIPSIS = re.compile(r"\.(?:[ \t]\.){2,}")  # ". . ." -> "..."
_CLAUSE_BREAK = re.compile(r"[,;:—–](?=\s)| [-–—](?=\s)")


def _word_before(text: str, end: int) -> str:
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end].lstrip("\"'“‘([{«")


def _is_boundary(line: str, m: re.Match) -> bool:
    marks = m.group(1)
    after = line[m.end():].lstrip()
    if not after:
        return True
    nxt = after[0]
    if nxt.islower():  # "e.g. the", "Wait... what", '"Why?" he asked'
        return False
    if marks != ".":
        return True
    word = _word_before(line, m.start(1))
    low = word.lower()
    if low in ABBREVIATIONS:
        return False
    if low in NUMBER_ABBREVIATIONS and nxt.isdigit():
        return False
    if len(word) == 1 and word.isalpha() and word.isupper():  # an initial: "J. R. R. Tolkien"
        return False
    if "." in word and all(part.isalpha() and len(part) <= 2 for part in word.split(".")):
        return False  # "e.g.", "i.e.", "U.S.", "a.m." (then a capital: keep together, like "D.C. The")
    return True


def _split_line(line: str) -> list[str]:
    out, start = [], 0
    for m in _BOUNDARY.finditer(line):
        if _is_boundary(line, m):
            out.append(line[start:m.end()])
            start = m.end()
    out.append(line[start:])
    return out


def _split_long(sentence: str, max_chars: int) -> list[str]:
    parts = []
    s = sentence
    while len(s) > max_chars:
        window = s[: max_chars + 1]
        floor = max_chars // 3
        cut = -1
        for m in _CLAUSE_BREAK.finditer(window):
            if floor <= m.end() <= max_chars:
                cut = m.end()
        if cut < 0:
            space = window.rfind(" ", floor)
            cut = space if space > 0 else max_chars
        parts.append(s[:cut].strip())
        s = s[cut:].strip()
    parts.append(s)
    return [p for p in parts if p]


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Split `text` into sentences of at most `max_chars` characters, in order.

    Whitespace inside a sentence is collapsed to single spaces; pieces holding no letter or digit
    (a lone "..." or "—") are attached to the sentence before them (dropped when that does not fit).

    >>> split_sentences("Mr. Smith paid $3.50, e.g. for tea. Then he left!\\nBye")
    ['Mr. Smith paid $3.50, e.g. for tea.', 'Then he left!', 'Bye']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if int(max_chars) < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars!r}")
    max_chars = int(max_chars)
    sentences: list[str] = []
    for line in text.splitlines():
        for piece in _split_line(_SPACED_ELLIPSIS.sub("...", line)):
            piece = _SPACE.sub(" ", piece).strip()
            if any(ch.isalnum() for ch in piece):
                sentences.extend(_split_long(piece, max_chars))
            elif piece and sentences and len(sentences[-1]) + 1 + len(piece) <= max_chars:
                sentences[-1] += " " + piece  # trailing punctuation only: keep it with its sentence
    return sentences
