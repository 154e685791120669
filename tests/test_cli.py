"""The `pycsm` command line, in-process through pycsm.cli.main(argv) and as `python -m pycsm`.

The tiny random model never ends an utterance by itself: every run is capped with
--max-audio-length 0.4 (5 frames). Runs that produce audio use the real Mimi codec (pycsm.codec).
"""

from __future__ import annotations

import io
import json
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

from pycsm import CSM, Segment
from pycsm.cli import main
from pycsm.model import Model

REPO = Path(__file__).resolve().parents[1]
SPF = 1920
CAP = ["--max-audio-length", "0.4", "--threads", "1"]  # 5 frames; one thread: quick even on a busy machine
PARAGRAPH = ("The sun rose over the hills. Birds began to sing! Was it morning already? Mr. Brown thought so. "
             "He made tea at 6.30 a.m. sharp. The kettle whistled.\nOutside, the dog barked. "
             "It wanted a walk… The neighbours waved. Then the day began.")


@pytest.fixture(scope="module")
def model(tiny_dir) -> str:
    return str(tiny_dir / "tiny-f16.gguf")


@pytest.fixture(scope="module")
def tts(model):
    with CSM(model, n_threads=1) as t:
        yield t


@pytest.fixture()
def run(capsys, monkeypatch):
    """main(argv) in-process with stdin from a string (not a terminal); returns (rc, stdout, stderr)."""

    def _run(argv, stdin: str = ""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def pcm16(path) -> np.ndarray:
    data, rate = sf.read(path, dtype="int16")
    assert rate == 24000
    return data


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(extra)
    return e


def assert_one_line_error(rc, err, status, pattern):
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycsm: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------------
# speaking (codec)
# ---------------------------------------------------------------------------------------------

def test_speak_to_wav_matches_the_api(run, model, tts, tmp_path):
    out = tmp_path / "hello.wav"
    rc, stdout, err = run(["Hello", "there.", "-m", model, "-o", out, "--seed", "1",
                           "--device", "cpu", *CAP])
    assert rc == 0, err
    assert stdout == ""
    assert "wrote 0.40 s" in err and "seed 1" in err
    ref = tts.generate("Hello there.", seed=1, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(out), ref.to_int16())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.wav"]


def test_default_output_is_out_wav(run, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["Hi.", "-m", model, "-q", *CAP])
    assert rc == 0 and err == ""
    assert len(pcm16(tmp_path / "out.wav")) == 5 * SPF


def test_sampling_flags_and_crispasr_spellings(run, model, tts, tmp_path):
    ref = tts.generate("Hi there.", speaker=1, temperature=0.5, top_k=10, seed=3, max_audio_length_ms=400)
    a = tmp_path / "a.wav"
    assert run(["Hi there.", "-m", model, "-o", a, "--speaker", "1", "-t", "0.5", "--top-k", "10",
                "--seed", "3", "-q", *CAP])[0] == 0
    np.testing.assert_array_equal(pcm16(a), ref.to_int16())
    b = tmp_path / "b.wav"
    assert run(["--tts", "Hi there.", "--tts-output", b, "-tp", "0.5", "--seed", "3", "--top-k", "10",
                "--speaker", "1", "-m", model, "--backend", "csm", "-q", *CAP])[0] == 0
    np.testing.assert_array_equal(pcm16(b), ref.to_int16())
    c = tmp_path / "c.wav"
    assert run(["Hi there.", "-m", model, "-o", c, "--speaker=1", "--temperature=0.5", "--top-k=10",
                "--seed=3", "-q", *CAP])[0] == 0
    np.testing.assert_array_equal(pcm16(c), ref.to_int16())


@pytest.mark.parametrize("suffix, fmt", [(".flac", "FLAC"), (".ogg", "OGG")])
def test_output_formats(run, model, tmp_path, suffix, fmt):
    out = tmp_path / f"x{suffix}"
    assert run(["Hi.", "-m", model, "-o", out, "-q", *CAP])[0] == 0
    info = sf.info(out)
    assert info.format == fmt and info.samplerate == 24000 and info.channels == 1


def test_text_from_stdin_and_file(run, model, tts, tmp_path):
    ref = tts.generate("Read from a file.", seed=4, max_audio_length_ms=400).to_int16()
    (tmp_path / "t.txt").write_text("Read from a file.\n", encoding="utf-8")
    sources = [(["-f", tmp_path / "t.txt"], ""), ([], "Read from a file.\n"), (["-f", "-"], "Read from a file.")]
    for args, stdin in sources:
        out = tmp_path / "o.wav"
        rc, _, err = run([*args, "-m", model, "-o", out, "--seed", "4", "-q", *CAP], stdin=stdin)
        assert rc == 0, err
        np.testing.assert_array_equal(pcm16(out), ref)


def test_output_raw(model, tts, capsysbinary, monkeypatch):
    ref = tts.generate("Raw audio.", seed=5, max_audio_length_ms=400).to_int16()
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for extra in ([], ["--stream"]):
        assert main(["Raw audio.", "-m", model, "--output-raw", "--seed", "5", "-q", *CAP, *extra]) == 0
        out = capsysbinary.readouterr().out
        got = np.frombuffer(out, dtype="<i2")
        assert got.shape == ref.shape
        assert np.abs(got.astype(int) - ref).max() <= 1  # streamed decode equals one-shot to ~1e-5


def test_stream_to_file(run, model, tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    assert run(["Streaming.", "-m", model, "-o", a, "--seed", "6", "-q", *CAP])[0] == 0
    assert run(["Streaming.", "-m", model, "-o", b, "--seed", "6", "--stream", "-q", *CAP])[0] == 0
    x, y = pcm16(a), pcm16(b)
    # F16 model: chunked and one-shot Mimi agree to F16 rounding (~1e-3), i.e. a few 16-bit steps
    assert x.shape == y.shape and np.abs(x.astype(int) - y).max() <= 64


def test_context_flags(run, model, tts, tmp_path):
    voice = tmp_path / "voice.wav"
    n = np.arange(int(0.5 * 16000))
    sf.write(voice, (0.3 * np.sin(2 * np.pi * 200 * n / 16000)).astype(np.float32), 16000)
    ctx = [Segment.from_file(voice, "A low hum.", 1), Segment.from_file(voice, "Again.", 0)]
    ref = tts.generate("Reply.", speaker=0, context=ctx, seed=7, max_audio_length_ms=400).to_int16()
    out = tmp_path / "o.wav"
    rc, _, err = run(["Reply.", "-m", model, "-o", out, "--seed", "7", "-q", *CAP,
                      "--context-audio", voice, "--context-text", "A low hum.", "--context-speaker", "1",
                      "--context-audio", voice, "--context-text", "Again.", "--context-speaker", "0"])
    assert rc == 0, err
    np.testing.assert_array_equal(pcm16(out), ref)
    # without --context-speaker the context uses --speaker
    ref1 = tts.generate("Reply.", speaker=1, context=[Segment.from_file(voice, "A low hum.", 1)], seed=7,
                        max_audio_length_ms=400).to_int16()
    rc, _, err = run(["Reply.", "-m", model, "-o", out, "--seed", "7", "--speaker", "1", "-q", *CAP,
                      "--context-audio", voice, "--context-text", "A low hum."])
    assert rc == 0, err
    np.testing.assert_array_equal(pcm16(out), ref1)


def test_prompt_too_long_for_the_context(run, model, tmp_path):
    voice = tmp_path / "voice.wav"
    sf.write(voice, np.zeros(4800, dtype=np.float32), 24000)
    out = tmp_path / "o.wav"
    rc, _, err = run(["Hi.", "-m", model, "-o", out, *CAP, "--context-audio", voice,
                      "--context-text", "word " * 2100])
    assert_one_line_error(rc, err, 1, "context holds 2048")
    assert not out.exists() and list(tmp_path.iterdir()) == [voice]


def test_verbose_and_quiet(run, model, tmp_path):
    out = tmp_path / "o.wav"
    rc, _, err = run(["Hi.", "-m", model, "-o", out, "-v", "--seed", "2", *CAP])
    assert rc == 0
    assert "loaded" in err  # the native library's log
    assert "seed 2" in err and "stop reason max_length" in err
    rc, _, err = run(["Hi.", "-m", model, "-o", out, "-q", *CAP])
    assert rc == 0 and err == ""


def test_long_text_to_one_file_without_bar_when_piped(run, model, tts, tmp_path):
    out = tmp_path / "story.wav"
    rc, _, err = run(["-m", model, "-o", out, "--seed", "8", *CAP], stdin=PARAGRAPH)
    assert rc == 0, err
    ref = tts.generate_long(PARAGRAPH, seed=8, max_audio_length_ms=400, pause_ms=150)
    data = pcm16(out)
    assert data.shape == (10 * 5 * SPF + 9 * 3600,)
    np.testing.assert_array_equal(data, ref.to_int16())
    assert "10/10" not in err and "\r" not in err  # no progress bar: stderr is not a terminal
    assert "wrote 5.35 s" in err


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, status 2 (usage) or 1 (runtime), no file left behind
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, stdin, status, pattern", [
    (["Hi.", "--quant", "q5"], "", 2, r"--quant: invalid choice: 'q5'.*f16.*q8_0.*q4_k"),
    (["", "-m", "{model}"], "", 2, "text is empty"),
    (["-m", "{model}"], "  \n ", 2, "text is empty"),
    (["Hi.", "-m", "{model}", "--speaker", "-1"], "", 2, "--speaker: must be >= 0"),
    (["Hi.", "-m", "{model}", "--speaker", "one"], "", 2, "--speaker: expected an integer"),
    (["Hi.", "-m", "{model}", "-t", "-1"], "", 2, "temperature"),
    (["Hi.", "-m", "{model}", "-tp", "nan"], "", 2, "temperature"),
    (["Hi.", "-m", "{model}", "--top-k", "-3"], "", 2, "--top-k"),
    (["Hi.", "-m", "{model}", "--max-audio-length", "0"], "", 2, "--max-audio-length: must be > 0"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/x.aiff"], "", 2, r"unknown audio file type '\.aiff'"),
    (["Hi.", "-m", "{model}", "--context-audio", "{tmp}/a.wav"], "", 2, "must be paired"),
    (["Hi.", "-m", "{model}", "--context-text", "x"], "", 2, "must be paired"),
    (["Hi.", "-m", "{model}", "--context-audio", "{tmp}/a.wav", "--context-text", "x", "--context-speaker", "0",
      "--context-speaker", "1"], "", 2, "--context-speaker"),
    (["Hi.", "-f", "{tmp}/t.txt", "-m", "{model}"], "", 2, "give the text once"),
    (["Hi.", "--tts", "Ho.", "-m", "{model}"], "", 2, "give the text once"),
    (["Hi.", "-m", "{model}", "--quant", "q8_0"], "", 2, "cannot be combined with --model"),
    (["Hi.", "-m", "{model}", "-v", "-q"], "", 2, "not allowed with"),
    (["Hi.", "-m", "{model}", "--output-raw", "-o", "{tmp}/x.wav"], "", 2, "--output-raw"),
    (["Hi.", "-m", "{model}", "--no-such-flag"], "", 2, "unrecognized arguments"),
    (["Hi.", "-m", "{tmp}/missing.gguf", "-o", "{tmp}/x.wav"], "", 1, "model file not found"),
    (["Hi.", "-m", "{tmp}/corrupt.gguf", "-o", "{tmp}/x.wav"], "", 1, "cannot load"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/x.wav", "--context-audio", "{tmp}/missing.wav", "--context-text", "x"],
     "", 1, "audio file not found"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/x.wav", "--context-audio", "{tmp}/junk.wav", "--context-text", "x"],
     "", 1, "cannot read audio file"),
    (["-f", "{tmp}/missing.txt", "-m", "{model}", "-o", "{tmp}/x.wav"], "", 1, "cannot read text file"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/no/such/dir/x.wav", *CAP], "", 1, "output folder does not exist"),
])
def test_bad_input(run, model, tmp_path, argv, stdin, status, pattern):
    (tmp_path / "t.txt").write_text("text", encoding="utf-8")
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not really a wave file" * 4)
    before = set(tmp_path.iterdir())
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    rc, out, err = run(argv, stdin=stdin)
    assert_one_line_error(rc, err, status, pattern)
    assert set(tmp_path.iterdir()) == before  # no output, no partial file


def test_no_text_on_a_terminal(model, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty(""))
    rc = main(["-m", model])
    assert_one_line_error(rc, capsys.readouterr().err, 2, "no text")


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ["--tts", "--tts-output", "-tp", "--context-audio", "--output-raw", "--stream", "--quant"]:
        assert flag in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pycsm 0.")


# ---------------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------------

def test_info(run, model):
    rc, out, err = run(["info", model])
    assert rc == 0, err
    assert model in out and "bb_n_layers" in out and "file size" in out and "f16/f32" in out
    rc, out, _ = run(["info", model, "--json"])
    d = json.loads(out)
    assert d["bb_n_layers"] == 2 and d["n_tensors"] > 0 and d["file_bytes"] == os.path.getsize(model)
    # which kernel runs quantised matrices, as the library reports it
    assert d["system"].startswith("ggml ") and ("matmul: pycsm AVX512-VNNI" in d["system"]) == (
        "matmul: ggml" not in d["system"])
    rc, _, err = run(["info", "/no/such/model.gguf"])
    assert_one_line_error(rc, err, 1, "not found")


def test_quantize(run, tiny_dir, tmp_path):
    out = tmp_path / "q.gguf"
    rc, _, err = run(["quantize", tiny_dir / "tiny-f32.gguf", out, "q8_0"])
    assert rc == 0, err
    with Model(out) as m:
        assert m.file_type == "q8_0"
    rc, _, err = run(["quantize", tiny_dir / "tiny-f32.gguf", tmp_path / "z.gguf", "q9_9"])
    assert_one_line_error(rc, err, 2, "unknown quantisation type")
    rc, _, err = run(["quantize", tmp_path / "missing.gguf", tmp_path / "z.gguf", "q8_0"])
    assert_one_line_error(rc, err, 1, "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_convert(run, tiny_dir, tmp_path):
    out = tmp_path / "c.gguf"
    rc, stdout, err = run(["convert", tiny_dir / "checkpoint", "-o", out, "--outtype", "f16"])
    assert rc == 0, err
    with Model(out) as m:
        assert m.hparams.bb_n_layers == 2
    rc, _, _ = run(["convert", tmp_path / "nothing", "-o", tmp_path / "d.gguf"])
    assert rc == 1 and not (tmp_path / "d.gguf").exists()


# ---------------------------------------------------------------------------------------------
# as a separate process
# ---------------------------------------------------------------------------------------------

def test_python_m_pycsm(model, tmp_path):  # codec
    out = tmp_path / "sub.wav"
    p = subprocess.run([sys.executable, "-m", "pycsm", "Hello.", "-m", model, "-o", str(out), "--seed", "1", *CAP],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(pcm16(out)) == 5 * SPF
    p = subprocess.run([sys.executable, "-m", "pycsm", "Hello.", "-m", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert_one_line_error(p.returncode, p.stderr, 1, "model file not found")


@pytest.mark.parametrize("extra", [[], ["--stream"]])  # --stream: codec (streaming decoder)
def test_ctrl_c_exits_130_without_partial_file(model, tmp_path, extra):
    out = tmp_path / "long.wav"
    # the child gets the default SIGINT disposition even when this run inherited it ignored (a
    # background job of a non-interactive shell), else Python installs no KeyboardInterrupt handler
    p = subprocess.Popen([sys.executable, "-m", "pycsm", "Hello.", "-m", model, "-o", str(out), "-v",
                          "--max-audio-length", "300", *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in p.stderr:  # wait until generation has started
        seen.append(line)
        if "generating" in line:
            break
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    rc = p.wait(timeout=60)
    err = "".join(seen) + rest
    assert rc == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def _bar_run(model, tmp_path, stderr_tty: bool):
    out = tmp_path / ("tty.wav" if stderr_tty else "pipe.wav")
    args = [sys.executable, "-m", "pycsm", "-f", "-", "-m", model, "-o", str(out), "--seed", "8", *CAP]
    if not stderr_tty:
        p = subprocess.run(args, input=PARAGRAPH, capture_output=True, text=True, env=env(), timeout=120)
        return p.returncode, p.stderr, out
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=slave, env=env())
    os.close(slave)
    p.stdin.write(PARAGRAPH.encode())
    p.stdin.close()
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
    return p.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace"), out


def test_progress_bar_only_on_a_terminal(model, tmp_path):  # codec
    rc, err, out = _bar_run(model, tmp_path, stderr_tty=True)
    assert rc == 0, err
    assert "10/10" in err and "sentence" in err
    rc2, err2, out2 = _bar_run(model, tmp_path, stderr_tty=False)
    assert rc2 == 0, err2
    assert "10/10" not in err2 and "\r" not in err2
    np.testing.assert_array_equal(pcm16(out), pcm16(out2))
    assert len(pcm16(out)) == 10 * 5 * SPF + 9 * 3600


# ---------------------------------------------------------------------------------------------
# examples/
# ---------------------------------------------------------------------------------------------

def test_examples_run(model, tmp_path):  # codec
    voice = tmp_path / "voice.wav"
    sf.write(voice, 0.1 * np.sin(np.arange(12000) / 10.0), 22050)
    lines = tmp_path / "lines.txt"
    lines.write_text("One.\n\nTwo.\nThree.\n", encoding="utf-8")
    quick = ["--model", model, "--max-seconds", "0.4", "--threads", "1"]
    runs = [
        (["quick_start.py", *quick, "-o", tmp_path / "q.wav"], None),
        (["voice_context.py", *quick, "--context-audio", voice, "--context-text", "Hm.", "-o", tmp_path / "v.wav"],
         None),
        (["streaming.py", "One. Two.", *quick, "-o", tmp_path / "s.wav"], None),
        (["streaming.py", "Raw.", *quick, "--raw"], 5 * SPF * 2),
        (["batch_lines.py", lines, *quick, "--out-dir", tmp_path / "lines"], None),
    ]
    for argv, raw_bytes in runs:
        p = subprocess.run([sys.executable, str(REPO / "examples" / argv[0]), *map(str, argv[1:])],
                           capture_output=True, env=env(), timeout=120)
        assert p.returncode == 0, (argv[0], p.stderr.decode())
        if raw_bytes is not None:
            assert len(p.stdout) == raw_bytes
    assert len(pcm16(tmp_path / "q.wav")) == 5 * SPF
    assert len(pcm16(tmp_path / "v.wav")) == 2 * 5 * SPF + int(0.3 * 24000)
    assert len(pcm16(tmp_path / "s.wav")) == 2 * 5 * SPF + 3600
    assert sorted(p.name for p in (tmp_path / "lines").iterdir()) == ["line_000.wav", "line_001.wav", "line_002.wav"]
