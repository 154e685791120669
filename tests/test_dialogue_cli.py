"""`pycsm dialogue`: scripts to a conversation file and per-turn files, on the tiny model.

The tiny random model never ends a turn: every run is capped with --max-audio-length 0.4 (5 frames).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pycsm import CSM, Voice
from pycsm.cli import main
from pycsm.voices import save_voice

REPO = Path(__file__).resolve().parents[1]
SPF = 1920
CAP = ["--max-audio-length", "0.4", "--threads", "1"]
SCRIPT = """\
# names mapped to ids by header lines
Ann = 0
Bob = 1

Ann: Did you see the sky this morning? It was red.
Bob: I did.
{"speaker": "Ann", "text": "Then we stay ashore: <|end_of_text|> is just text."}
"""
TURNS = [(0, "Did you see the sky this morning? It was red."), (1, "I did."),
         (0, "Then we stay ashore: <|end_of_text|> is just text.")]


@pytest.fixture(scope="module")
def model(tiny_dir) -> str:
    return str(tiny_dir / "tiny-f16.gguf")


@pytest.fixture(scope="module")
def tts(model):
    with CSM(model, n_threads=1) as t:
        yield t


@pytest.fixture()
def run(capsys, monkeypatch):
    """main(["dialogue", ...]) in-process with stdin from a string; returns (rc, stdout, stderr)."""

    def _run(argv, stdin: str = ""):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
        rc = main(["dialogue", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def pcm16(path) -> np.ndarray:
    data, rate = sf.read(path, dtype="int16")
    assert rate == 24000
    return data


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def one_line_error(rc, err, status, pattern):
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycsm: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_script_to_files_matches_converse(run, model, tts, tmp_path):  # codec
    script = tmp_path / "talk.txt"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "talk.wav"
    rc, _, err = run([script, "-m", model, "-o", out, "--turn-dir", tmp_path / "turns", "--seed", "4",
                      "--gap", "200", "--pause", "100", *CAP])
    assert rc == 0, err
    assert "wrote" in err and "3 turns" in err
    conv = tts.converse(TURNS, seed=4, gap_ms=200, pause_ms=100, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(out), conv.audio.to_int16())
    names = sorted(p.name for p in (tmp_path / "turns").iterdir())
    assert names == ["001-Ann.wav", "002-Bob.wav", "003-Ann.wav"]
    for name, audio in zip(names, conv.turns):
        np.testing.assert_array_equal(pcm16(tmp_path / "turns" / name), audio.to_int16())
    # plain text: the special-token text of the last turn was read as characters
    special = tts.converse(TURNS, seed=4, max_audio_length_ms=400, parse_special=True)
    tok = tts.model.tokenizer
    assert conv.pieces[-1].n_prompt - special.pieces[-1].n_prompt == \
        len(tok.encode_segment(TURNS[2][1], 0, parse_special=False)) - len(tok.encode_segment(TURNS[2][1], 0)) > 0


def test_script_from_stdin_and_flac(run, model, tts, tmp_path):  # codec
    out = tmp_path / "talk.flac"
    rc, _, err = run(["-", "-m", model, "-o", out, "--seed", "4", "-q", *CAP],
                     stdin="0: Hello there.\n{\"speaker\": 1, \"text\": \"Hi.\"}\n")
    assert rc == 0 and err == "", err
    conv = tts.converse([(0, "Hello there."), (1, "Hi.")], seed=4, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(out), conv.audio.to_int16())
    assert len(pcm16(out)) == 2 * 5 * SPF + 300 * 24  # the default gap: 300 ms


def test_wav_to_standard_output(model, tts):  # codec
    p = subprocess.run([sys.executable, "-m", "pycsm", "dialogue", "-", "-m", model, "-o", "-", "--seed", "3", *CAP],
                       input=b"0: Hello.\n1: Hi.\n", capture_output=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout[:4] == b"RIFF" and "to standard output" in p.stderr.decode()
    conv = tts.converse([(0, "Hello."), (1, "Hi.")], seed=3, max_audio_length_ms=400)
    np.testing.assert_array_equal(np.frombuffer(p.stdout[44:], dtype="<i2"), conv.audio.to_int16())


def test_saved_voices_from_header_json_and_flags(run, model, tts, tmp_path, monkeypatch):  # codec
    monkeypatch.setenv("PYCSM_VOICES", str(tmp_path / "voices"))
    ann = Voice(5, "I am Ann.", tts.generate("I am Ann.", seed=1, max_audio_length_ms=240).codes)
    bob = Voice(0, "I am Bob.", tts.generate("I am Bob.", speaker=1, seed=2, max_audio_length_ms=160).codes)
    ann.save(tmp_path / "ann.csmvoice")
    save_voice(bob, "bob")
    script = tmp_path / "talk.txt"
    script.write_text(f"Ann = {tmp_path / 'ann.csmvoice'}\n"
                      '{"speaker": "Bob", "text": "Hello, Ann.", "voice": "bob"}\n'
                      "Ann: Hello, Bob.\n", encoding="utf-8")
    turns = [("Bob", "Hello, Ann."), ("Ann", "Hello, Bob.")]
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "a.wav", "--seed", "6", *CAP])
    assert rc == 0, err
    expect = tts.converse(turns, {"Ann": ann, "Bob": bob}, seed=6, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(tmp_path / "a.wav"), expect.audio.to_int16())
    # --voice overrides the script's header
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "b.wav", "--seed", "6", "--voice", "Ann=bob", *CAP])
    assert rc == 0, err
    expect = tts.converse(turns, {"Ann": bob, "Bob": bob}, seed=6, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(tmp_path / "b.wav"), expect.audio.to_int16())
    # a voice that does not exist: one line naming where it was asked for, nothing written
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "c.wav", "--voice", "Bob=nobody", *CAP])
    one_line_error(rc, err, 1, r"--voice Bob: no voice named 'nobody'")
    script.write_text("Ann = missing.csmvoice\nAnn: Hi.\n", encoding="utf-8")
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "c.wav", *CAP])
    one_line_error(rc, err, 1, r"line 1: voice file not found: missing.csmvoice")
    assert not (tmp_path / "c.wav").exists()


def test_turn_that_cannot_fit_names_its_line(run, model, tmp_path):
    # a 2030-frame voice leaves no room in the 2048 positions for a turn of ~20 tokens
    Voice(0, "Long.", np.zeros((2030, 32), dtype=np.int32)).save(tmp_path / "long.csmvoice")
    script = tmp_path / "talk.txt"
    script.write_text(f"Ann = {tmp_path / 'long.csmvoice'}\n0: Hi.\n\nAnn: A turn that is somewhat longer than that.\n",
                      encoding="utf-8")
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "x.wav", *CAP])
    one_line_error(rc, err, 1, r"talk.txt: line 4: turn 2 needs \d+ prompt positions \(voice references and "
                               r"context: 20\d\d\) but the context holds 2048")
    assert not (tmp_path / "x.wav").exists()


def test_voice_flag_maps_a_name_to_an_id(run, model, tts, tmp_path):  # codec
    out = tmp_path / "v.wav"
    rc, _, err = run(["-", "-m", model, "-o", out, "--seed", "2", "--voice", "Cy=1", *CAP],
                     stdin="Cy: Hello.\n0: Hi, Cy.\n")
    assert rc == 0, err
    conv = tts.converse([(1, "Hello."), (0, "Hi, Cy.")], seed=2, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(out), conv.audio.to_int16())


@pytest.mark.parametrize("argv, stdin, status, pattern", [
    (["-"], "Ann: Hi.\n", 2, r"standard input: line 1: unknown speaker 'Ann'"),
    (["-"], "0: Hi.\n1:   \n", 2, r"standard input: line 2: empty turn"),
    (["-"], "0: Hi.\n{\"speaker\": 0\n", 2, r"line 2: invalid JSON"),
    (["-"], "# nothing\n", 2, r"the script has no turns"),
    (["-", "--voice", "Ann"], "0: Hi.\n", 2, r"--voice 'Ann': expected NAME_OR_ID=VOICE"),
    (["-", "--voice", "Ann=1", "--voice", "Ann=0"], "0: Hi.\n", 2, r"--voice Ann is given twice"),
    (["-", "--voice", "Cy=1"], "0: Hi.\n", 2, r"--voice Cy: no turn of the script is spoken by Cy"),
    (["-", "-o", "x.xyz"], "0: Hi.\n", 2, r"unknown audio file type"),
    (["-", "-o", "no/such/folder/x.wav"], "0: Hi.\n", 1, r"output folder does not exist"),
    (["-", "--gap", "-5"], "0: Hi.\n", 2, r"--gap"),
    (["-", "--max-audio-length", "0"], "0: Hi.\n", 2, r"--max-audio-length"),
    (["missing.txt"], "", 1, r"cannot read script missing.txt"),
])
def test_bad_scripts_and_flags(run, model, tmp_path, monkeypatch, argv, stdin, status, pattern):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run([*argv, "-m", model, *CAP], stdin=stdin)
    one_line_error(rc, err, status, pattern)
    assert list(tmp_path.iterdir()) == []


def test_script_not_utf8(run, model, tmp_path):
    script = tmp_path / "bad.txt"
    script.write_bytes(b"0: caf\xe9\n")
    rc, _, err = run([script, "-m", model, "-o", tmp_path / "x.wav", *CAP])
    one_line_error(rc, err, 1, r"script .*bad.txt is not UTF-8 text: byte 0xe9 at offset 6")


def test_ctrl_c_leaves_no_partial_file(model, tmp_path):
    out = tmp_path / "long.wav"
    p = subprocess.Popen([sys.executable, "-m", "pycsm", "dialogue", "-", "-m", model, "-o", str(out), "-v",
                          "--max-audio-length", "300", "--threads", "1"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    p.stdin.write("0: Hello.\n1: Hi.\n")
    p.stdin.close()
    seen = []
    for line in p.stderr:  # wait until generation has started
        seen.append(line)
        if "speaking" in line:
            break
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    rc = p.wait(timeout=60)
    err = "".join(seen) + rest
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_on_a_terminal(model, tmp_path):  # codec
    import fcntl
    import pty
    import struct
    import termios

    script = tmp_path / "talk.txt"
    script.write_text(SCRIPT, encoding="utf-8")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "pycsm", "dialogue", str(script), "-m", model,
                          "-o", str(tmp_path / "t.wav"), *CAP],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env())
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace")
    assert p.wait(timeout=120) == 0, err
    assert "3/3" in err and "turn" in err


def test_example_runs(model, tmp_path):  # codec
    out = tmp_path / "example.wav"
    p = subprocess.run([sys.executable, str(REPO / "examples" / "dialogue.py"), "--model", model,
                        "--max-seconds", "0.4", "--threads", "1", "-o", str(out), "--turn-dir", str(tmp_path / "t")],
                       capture_output=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    audio = pcm16(out)
    turns = sorted((tmp_path / "t").iterdir())
    assert len(turns) >= 4
    assert len(audio) == sum(len(pcm16(t)) for t in turns) + (len(turns) - 1) * 300 * 24
