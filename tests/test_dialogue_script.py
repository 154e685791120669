"""Dialogue scripts (pycsm.dialogue_script): turns, headers, JSON lines and one-line errors."""

from __future__ import annotations

import pytest

from pycsm.dialogue_script import ScriptError, parse_script

SCRIPT = """\
# a two-speaker script
Ann = voices/ann.csmvoice
Bob = 1
Win = C:\\voices\\win.csmvoice

Ann: Did you see the sky this morning?
Bob:I did: red, at dawn.
0: An id needs no mapping.
{"speaker": "Cy", "text": "A JSON line: <|end_of_text|> stays text.", "voice": "cy"}
{"speaker": 3, "text": "By id."}
Win: Windows paths work too.
"""


def test_parse_script():
    s = parse_script(SCRIPT)
    assert s.turns == [("Ann", " Did you see the sky this morning?", 6), ("Bob", "I did: red, at dawn.", 7),
                       (0, " An id needs no mapping.", 8),
                       ("Cy", "A JSON line: <|end_of_text|> stays text.", 9), (3, "By id.", 10),
                       ("Win", " Windows paths work too.", 11)]
    assert s.voices == {"Ann": ("voices/ann.csmvoice", 2), "Cy": ("cy", 9), "Win": ("C:\\voices\\win.csmvoice", 4)}
    assert s.ids == {"Bob": 1}


def test_names_mapped_by_the_caller():
    with pytest.raises(ScriptError, match=r"line 1: unknown speaker 'Ann' \(map it"):
        parse_script("Ann: Hi.\n")
    assert parse_script("Ann: Hi.\n", mapped={"Ann"}).turns == [("Ann", " Hi.", 1)]


@pytest.mark.parametrize("text, message", [
    ("Ann = a.csmvoice\nAnn: \n", "line 2: empty turn"),
    ("0: Hi.\n{\"speaker\": 1, \"text\": \"  \"}\n", "line 2: empty turn"),
    ("0: Hi.\nBob: Hello.\n", "line 2: unknown speaker 'Bob'"),
    ("0: Hi.\nAnn = 1\n", "line 2: a speaker mapping .* must come before the first turn"),
    ("Ann = 1\nAnn = 2\n0: x\n", r"line 2: Ann is already mapped \(line 1\)"),
    ("Ann =\n0: x\n", "line 1: nothing after '='"),
    ("1 = a.csmvoice\n", "line 1: map a name, not the speaker id 1"),
    ("just words\n", "line 1: expected 'SPEAKER: text'"),
    (": no speaker\n", "line 1: expected 'SPEAKER: text'"),
    ("99999999999: Hi.\n", "line 1: speaker id 99999999999 is out of range"),
    ("{\"speaker\": 0, \"text\": \"Hi.\"\n", "line 1: invalid JSON"),
    ("[1, 2]\n", "line 1: expected"),
    ("{\"speaker\": 0}\n", "line 1: a JSON turn needs"),
    ("{\"speaker\": 0, \"text\": \"x\", \"mood\": 1}\n", "line 1: unknown key.*mood"),
    ("{\"speaker\": -1, \"text\": \"x\"}\n", "line 1: speaker id -1 is out of range"),
    ("{\"speaker\": true, \"text\": \"x\"}\n", "line 1: the speaker must be"),
    ("{\"speaker\": 0, \"text\": 5}\n", "line 1: \"text\" must be a string"),
    ("{\"speaker\": 0, \"text\": \"x\", \"voice\": 5}\n", "line 1: the voice must be"),
    ("Ann = a\n{\"speaker\": \"Ann\", \"text\": \"x\", \"voice\": \"b\"}\n",
     r"line 2: speaker Ann already has .*\(line 1\)"),
    ("# only a comment\n\n", "the script has no turns"),
])
def test_bad_scripts(text, message):
    with pytest.raises(ScriptError, match=message):
        parse_script(text)
