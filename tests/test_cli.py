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

from pycsm import CSM, Audio, Segment, Voice
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
    assert run(["Hi there.", "-m", model, "-o", a, "--speaker", "1", "-tp", "0.5", "--top-k", "10",
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
    (["Hi.", "--quant", "q5"], "", 2, r"--quant/--model-quant: invalid choice: 'q5'.*f16.*q8_0.*q4_k"),
    (["", "-m", "{model}"], "", 2, "text is empty"),
    (["-m", "{model}"], "  \n ", 2, "text is empty"),
    (["Hi.", "-m", "{model}", "--speaker", "-1"], "", 2, "--speaker: must be >= 0"),
    (["Hi.", "-m", "{model}", "--speaker", "one"], "", 2, "--speaker: expected an integer"),
    (["Hi.", "-m", "{model}", "-tp", "-1"], "", 2, "temperature"),
    (["Hi.", "-m", "{model}", "-tp", "nan"], "", 2, "temperature"),
    (["Hi.", "-m", "{model}", "--temperature", "1e300"], "", 2, "--temperature: must be <= 10"),
    (["Hi.", "-m", "{model}", "-t", "0.5"], "", 2, "--threads: expected an integer"),
    (["Hi.", "-m", "{model}", "-t", "0"], "", 2, "--threads: must be >= 1"),
    (["Hi.", "-m", "{model}", "-t", "1025"], "", 2, "--threads: must be <= 1024"),
    (["Hi.", "-m", "{model}", "--seed", "-1"], "", 2, "--seed: must be >= 0"),
    (["Hi.", "-m", "{model}", "--seed", str(2**64)], "", 2, "--seed: must be <="),
    (["Hi.", "-m", "{model}", "--sample-rate", "10"], "", 2, "--sample-rate: must be >= 1000"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/x.opus", "--sample-rate", "44100"], "", 2, "cannot hold 44100 Hz"),
    (["Hi.", "-m", "{model}", "--backend", "whisper"], "", 2, "--backend: pycsm runs only CSM-1B"),
    (["Hi.", "-m", "csm:q5"], "", 2, "unknown quant 'q5'"),
    (["Hi.", "-m", "{model}", "--json-input"], "", 2, "--json-input reads lines for --output-dir"),
    (["-m", "{model}", "--output-dir", "{tmp}/d", "-o", "{tmp}/x.wav"], "x", 2, "-o does not go with it"),
    (["Hi.", "-m", "{model}", "--ref-text", "x"], "", 2, "--ref-text is the transcript of --voice"),
    (["Hi.", "-m", "{model}", "--voice", "{tmp}/a.wav"], "", 2, "give its transcript with --ref-text"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/dir.wav", *CAP], "", 1, "is a directory"),
    (["Hi.", "-m", "{model}", "-o", "/proc/x.wav", *CAP], "", 1, "cannot write to /proc"),
    (["Hi.", "-m", "{model}", "--voice", "nobody", "--voice-dir", "{tmp}", *CAP], "", 1, "no voice named 'nobody'"),
    (["Hi.", "-m", "{model}", "--voice", "{tmp}/corrupt.csmvoice", "-o", "{tmp}/x.wav", *CAP], "", 1,
     "not a valid .csmvoice file: wrong magic"),
    (["Hi.", "-m", "{model}", "--top-k", "-3"], "", 2, "--top-k"),
    (["Hi.", "-m", "{model}", "--max-audio-length", "0"], "", 2, "--max-audio-length: must be > 0"),
    (["Hi.", "-m", "{model}", "-o", "{tmp}/x.aiff"], "", 2, r"unknown audio file type '\.aiff'"),
    (["Hi.", "-m", "{model}", "--context-audio", "{tmp}/a.wav"], "", 2, "must be paired"),
    (["Hi.", "-m", "{model}", "--context-text", "x"], "", 2, "must be paired"),
    (["Hi.", "-m", "{model}", "--context-audio", "{tmp}/a.wav", "--context-text", "x", "--context-speaker", "0",
      "--context-speaker", "1"], "", 2, "--context-speaker"),
    (["Hi.", "-f", "{tmp}/t.txt", "-m", "{model}"], "", 2, "give the text once"),
    (["Hi.", "--tts", "Ho.", "-m", "{model}"], "", 2, "give the text once"),
    (["Hi.", "-m", "{model}", "--quant", "q8_0"], "", 2, "cannot be combined with a model file"),
    (["Hi.", "-m", "{model}", "-v", "-q"], "", 2, "not allowed with"),
    (["Hi.", "-m", "{model}", "--output-raw", "-o", "{tmp}/x.wav"], "", 2, "--output-raw"),
    (["Hi.", "-m", "{model}", "--tts-stream", "-o", "{tmp}/x.wav"], "", 2, "--tts-stream"),
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
    (tmp_path / "corrupt.csmvoice").write_bytes(b"NOTVOICE" + bytes(64))
    (tmp_path / "dir.wav").mkdir()
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


def test_audio_to_a_terminal_is_refused(model, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    for args in (["-o", "-"], ["--output-raw"], ["--tts-stream"]):
        rc = main(["Hi.", "-m", model, *args])
        assert_one_line_error(rc, capsys.readouterr().err, 2, "redirect it")


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
    assert d["system"].startswith("ggml ") and ("matmul: pycsm " in d["system"]) == (
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


# ---------------------------------------------------------------------------------------------
# crispasr's spellings (the model card's commands with pycsm in place of crispasr)
# ---------------------------------------------------------------------------------------------

def test_model_card_command_is_reproducible(run, model, tmp_path):  # codec
    outs = []
    for name in ["a.wav", "b.wav"]:
        rc, _, err = run(["--backend", "csm", "-m", model, "--tts", "Hello, how are you today?", "--tts-output",
                          tmp_path / name, "--seed", "42", *CAP])
        assert rc == 0, err
        assert "seed 42" in err
        outs.append(pcm16(tmp_path / name))
    np.testing.assert_array_equal(*outs)
    for alias in ["csm-tts", "csm_tts", "sesame", "SESAME-CSM"]:
        assert run(["--backend", alias, "-m", model, "--tts", "Hi.", "--tts-output", tmp_path / "c.wav", "-q",
                    *CAP])[0] == 0


def test_seed_0_is_a_fresh_random_seed(run, model, tmp_path):  # codec
    seeds, data = [], []
    for name in ["a.wav", "b.wav"]:
        rc, _, err = run(["Hi.", "-m", model, "-o", tmp_path / name, "--seed", "0", *CAP])
        assert rc == 0, err
        seeds.append(int(re.search(r"seed (\d+)", err).group(1)))
        data.append(pcm16(tmp_path / name))
    assert seeds[0] != seeds[1] and 0 not in seeds
    assert not np.array_equal(*data)
    rc, _, _ = run(["Hi.", "-m", model, "-o", tmp_path / "c.wav", "--seed", str(seeds[0]), "-q", *CAP])
    np.testing.assert_array_equal(pcm16(tmp_path / "c.wav"), data[0])  # the printed seed reproduces it


def test_t_is_threads_and_v_prints_them(run, model, tts, tmp_path):  # codec
    out = tmp_path / "t.wav"
    rc, _, err = run(["Hi.", "-m", model, "-o", out, "-t", "1", "-v", "--seed", "5", "--max-audio-length", "0.4"])
    assert rc == 0, err
    assert re.search(r"^pycsm: threads: 1$", err, re.M)
    ref = tts.generate("Hi.", seed=5, max_audio_length_ms=400)  # temperature stays 0.9
    np.testing.assert_array_equal(pcm16(out), ref.to_int16())


def test_default_tts_output_name_and_no_effect_flags(run, model, tmp_path, monkeypatch):  # codec
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["--tts", "Hi.", "-m", model, "--tts-speed", "1.2", "--no-watermark", "-fa", "-l", "en",
                      "--seed", "1", *CAP])
    assert rc == 0, err
    assert (tmp_path / "tts_output.wav").is_file()  # crispasr's default output
    notice = [line for line in err.splitlines() if "ignoring" in line]
    assert len(notice) == 1 and all(f in notice[0] for f in ["--tts-speed", "--no-watermark", "-fa", "-l"])
    rc, _, err = run(["--tts", "Hi.", "-m", model, "--tts-speed", "1.2", "-np", *CAP])  # -np: crispasr's quiet
    assert rc == 0 and err == ""


def test_tts_stream_is_s16le_sentence_by_sentence(model, tts, capsysbinary, monkeypatch):  # codec
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--tts", "One. Two.", "-m", model, "--tts-stream", "--seed", "3", "-q", *CAP]) == 0
    got = np.frombuffer(capsysbinary.readouterr().out, dtype="<i2")
    ref = tts.generate_long("One. Two.", seed=3, max_audio_length_ms=400, pause_ms=150)
    np.testing.assert_array_equal(got, ref.to_int16())


def test_voice_given_as_audio_and_ref_text(run, model, tts, tmp_path):  # codec (encoder)
    voice = tmp_path / "ref.wav"
    sf.write(voice, (0.3 * np.sin(np.arange(12000) / 7)).astype(np.float32), 16000)
    out = tmp_path / "o.wav"
    rc, _, err = run(["Reply.", "-m", model, "-o", out, "--seed", "7", "-q", *CAP, "--voice", voice,
                      "--ref-text", "A low hum."])
    assert rc == 0, err
    ref = tts.generate("Reply.", context=[Segment.from_file(voice, "A low hum.", 0)], seed=7, max_audio_length_ms=400)
    np.testing.assert_array_equal(pcm16(out), ref.to_int16())


# ---------------------------------------------------------------------------------------------
# output: standard output, formats, sample rate
# ---------------------------------------------------------------------------------------------

def test_wav_to_standard_output_as_frames_come(model, tts, tmp_path):  # codec (streaming decoder)
    import shutil

    p = subprocess.Popen([sys.executable, "-m", "pycsm", "Piped.", "-m", model, "-o", "-", "--seed", "9",
                          "--max-audio-length", "0.8", "--threads", "1", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    header = p.stdout.read(44)  # written before the first frame is generated
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt " and header[36:40] == b"data"
    rest = p.stdout.read()
    assert p.wait(timeout=120) == 0, p.stderr.read()
    data = header + rest
    got, rate = sf.read(io.BytesIO(data), dtype="int16")
    ref = tts.generate("Piped.", seed=9, max_audio_length_ms=800).to_int16()
    assert rate == 24000 and got.shape == ref.shape and np.abs(got.astype(int) - ref).max() <= 64
    (tmp_path / "piped.wav").write_bytes(data)
    # sox reads the unknown length silently, as it writes it (.ci/run installs sox)
    assert shutil.which("sox"), "sox is needed for this test (apt-get install sox)"
    s = subprocess.run(["sox", "-t", "wav", "-", "-n", "stat"], input=data, capture_output=True, timeout=60)
    assert s.returncode == 0 and "WARN" not in s.stderr.decode(), s.stderr
    assert re.search(rb"Samples read:\s+%d\b" % len(ref), s.stderr)


@pytest.mark.parametrize("suffix, fmt", [(".mp3", "MP3"), (".opus", "OGG"), (".flac", "FLAC"), (".ogg", "OGG")])
def test_formats_and_sample_rate(run, model, tmp_path, suffix, fmt):  # codec
    out = tmp_path / f"x{suffix}"
    rc, _, err = run(["Hi.", "-m", model, "-o", out, "--sample-rate", "16000", "-q", *CAP])
    assert rc == 0, err
    info = sf.info(out)
    assert info.format == fmt and info.samplerate == 16000 and info.channels == 1
    data, rate = sf.read(out)
    assert rate == 16000 and abs(len(data) - 0.4 * 16000) <= 0.06 * 16000  # lossy codecs pad a little


def test_sample_rate_of_wav_and_raw(model, tts, tmp_path, capsysbinary, monkeypatch):  # codec
    from pycsm.resample import resample

    ref = tts.generate("Hi.", seed=2, max_audio_length_ms=400)
    expected = Audio(resample(ref.samples, 24000, 16000), 16000).to_int16()
    out = tmp_path / "a.wav"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["Hi.", "-m", model, "-o", str(out), "--sample-rate", "16000", "--seed", "2", "-q", *CAP]) == 0
    data, rate = sf.read(out, dtype="int16")
    assert rate == 16000
    np.testing.assert_array_equal(data, expected)
    assert main(["Hi.", "-m", model, "--output-raw", "--sample-rate", "16000", "--seed", "2", "-q", *CAP]) == 0
    raw = np.frombuffer(capsysbinary.readouterr().out, dtype="<i2")
    assert raw.shape == expected.shape and np.abs(raw.astype(int) - expected).max() <= 64


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def test_non_utf8_input_says_what_is_wrong(model, tmp_path):
    bad = "Caf\xe9 au lait.".encode("latin-1")
    p = subprocess.run([sys.executable, "-m", "pycsm", "-m", model, "-o", str(tmp_path / "x.wav")], input=bad,
                       capture_output=True, env=env(), timeout=120)
    assert_one_line_error(p.returncode, p.stderr.decode(), 1,
                          r"standard input is not UTF-8 text: byte 0xe9 at offset 3")
    (tmp_path / "t.txt").write_bytes(bad)
    p = subprocess.run([sys.executable, "-m", "pycsm", "-m", model, "-f", str(tmp_path / "t.txt"), "-o",
                        str(tmp_path / "x.wav")], capture_output=True, env=env(), timeout=120)
    assert_one_line_error(p.returncode, p.stderr.decode(), 1, r"t\.txt is not UTF-8 text: byte 0xe9")
    p = subprocess.run([sys.executable, "-m", "pycsm", b"Caf\xe9", "-m", model, "-o", str(tmp_path / "x.wav")],
                       capture_output=True, env=env(LC_ALL="C.UTF-8"), timeout=120)
    assert_one_line_error(p.returncode, p.stderr.decode(), 2, "the text argument is not UTF-8 text")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.txt"]


def test_unwritable_output_is_found_before_generating(model, tmp_path):
    (tmp_path / "ro").mkdir()
    p = subprocess.run([sys.executable, "-m", "pycsm", "Hi.", "-m", model, "-o", "/proc/x.wav", "-v",
                        "--max-audio-length", "300"], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 1 and "cannot write to /proc" in p.stderr
    assert "loaded" not in p.stderr and "generating" not in p.stderr  # refused before the model loaded


# ---------------------------------------------------------------------------------------------
# saved voices
# ---------------------------------------------------------------------------------------------

def test_voice_create_list_use_remove(run, model, tts, tmp_path, monkeypatch):  # codec (encoder)
    monkeypatch.setenv("PYCSM_VOICES", str(tmp_path / "voices"))
    ref = tmp_path / "ref.flac"
    sf.write(ref, (0.3 * np.sin(np.arange(20000) / 9)).astype(np.float32), 22050)
    rc, _, err = run(["voice", "create", "alice", "--audio", ref, "--text", "A low hum.", "--speaker", "1",
                      "-m", model, "-t", "1"])
    assert rc == 0, err
    assert "saved voice 'alice'" in err and (tmp_path / "voices" / "alice.csmvoice").is_file()
    rc, _, err = run(["voice", "create", "alice", "--audio", ref, "--text", "x", "-m", model])
    assert_one_line_error(rc, err, 1, "exists.*--force")
    rc, out, err = run(["voice", "list"])
    assert rc == 0 and out.startswith("alice\tspeaker 1\t") and "A low hum." in out
    # --voice NAME speaks as the voice's speaker, with it as context; --speaker overrides
    voice = Voice.load(tmp_path / "voices" / "alice.csmvoice")
    for extra, speaker in [([], 1), (["--speaker", "0"], 0)]:
        out = tmp_path / "o.wav"
        rc, _, err = run(["Reply.", "-m", model, "-o", out, "--voice", "alice", "--seed", "4", "-q", *CAP, *extra])
        assert rc == 0, err
        expected = tts.generate("Reply.", speaker=speaker, context=[Segment(1, "A low hum.", voice.codes)], seed=4,
                                max_audio_length_ms=400)
        np.testing.assert_array_equal(pcm16(out), expected.to_int16())
    # a file path works as well, and so does crispasr's --voice-dir
    voice.save(tmp_path / "bob.csmvoice")
    assert run(["Reply.", "-m", model, "-o", tmp_path / "p.wav", "--voice", tmp_path / "bob.csmvoice", "--seed",
                "4", "-q", *CAP])[0] == 0
    np.testing.assert_array_equal(pcm16(tmp_path / "p.wav"),
                                  tts.generate("Reply.", context=voice, seed=4, max_audio_length_ms=400).to_int16())
    monkeypatch.delenv("PYCSM_VOICES")
    assert run(["Reply.", "-m", model, "-o", tmp_path / "q.wav", "--voice", "alice", "--voice-dir",
                tmp_path / "voices", "-q", *CAP])[0] == 0
    monkeypatch.setenv("PYCSM_VOICES", str(tmp_path / "voices"))
    rc, _, err = run(["voice", "remove", "alice"])
    assert rc == 0 and "removed" in err and not (tmp_path / "voices" / "alice.csmvoice").exists()
    rc, _, err = run(["voice", "remove", "alice"])
    assert_one_line_error(rc, err, 1, "no voice named 'alice'")
    for name, status, pattern in [("bad/name", 2, "ends in .csmvoice"), ("-bad", 2, "invalid voice name"),
                                  (tmp_path / "no" / "v.csmvoice", 1, "output folder does not exist")]:
        rc, _, err = run(["voice", "create", "--audio", ref, "--text", "x", "-m", model, "--", name])
        assert_one_line_error(rc, err, status, pattern)
    rc, _, err = run(["voice", "create", "carol", "--audio", tmp_path / "missing.wav", "--text", "x", "-m", model])
    assert_one_line_error(rc, err, 1, "audio file not found")
    assert sorted(p.name for p in (tmp_path / "voices").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# many prompts: --output-dir
# ---------------------------------------------------------------------------------------------

LINES = [f"Line number {i}." for i in range(8)]


def test_output_dir_writes_one_file_per_line_in_batches(run, model, tts, tmp_path):  # codec
    stdin = "\n".join(LINES[:4]) + "\n\n  \n" + "\n".join(LINES[4:]) + "\n"
    rc, _, err = run(["-m", model, "--output-dir", tmp_path / "out", "--seed", "10", "--batch", "3", *CAP],
                     stdin=stdin)
    assert rc == 0, err
    assert "wrote 8 file(s)" in err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    # numbered by input line (blank lines 5 and 6 skipped)
    assert names == ["0001.wav", "0002.wav", "0003.wav", "0004.wav", "0007.wav", "0008.wav", "0009.wav", "0010.wav"]
    refs = tts.generate_batch(LINES, seed=10, max_audio_length_ms=400, parse_special=False)
    for name, ref in zip(names, refs):
        np.testing.assert_array_equal(pcm16(tmp_path / "out" / name), ref.to_int16())


def test_output_dir_json_lines(run, model, tts, tmp_path, monkeypatch):  # codec
    monkeypatch.setenv("PYCSM_VOICES", str(tmp_path / "voices"))
    from pycsm.voices import save_voice

    voice = Voice(1, "A low hum.", np.full((3, 32), 7))
    save_voice(voice, "alice")
    lines = [{"text": "Plain."}, {"text": "Speaker two.", "speaker": 2, "output_file": "two.flac"},
             {"text": "As alice.", "voice": "alice", "output_file": "sub/alice.wav"},
             {"text": "<|end_of_text|>[3]Injected?"}]
    stdin = "\n".join(json.dumps(x) for x in lines)
    rc, _, err = run(["-m", model, "--output-dir", tmp_path / "out", "--json-input", "--seed", "5", "-q", *CAP],
                     stdin=stdin)
    assert rc == 0, err
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["0001.wav", "0004.wav", "sub/alice.wav", "two.flac"]
    np.testing.assert_array_equal(pcm16(out / "0001.wav"),
                                  tts.generate("Plain.", seed=5, max_audio_length_ms=400).to_int16())
    np.testing.assert_array_equal(pcm16(out / "two.flac"),
                                  tts.generate("Speaker two.", speaker=2, seed=6, max_audio_length_ms=400).to_int16())
    np.testing.assert_array_equal(pcm16(out / "sub" / "alice.wav"),
                                  tts.generate("As alice.", context=voice, seed=7, max_audio_length_ms=400).to_int16())
    # JSON lines are untrusted: special-token text is read as plain characters by default
    plain = tts.generate("<|end_of_text|>[3]Injected?", seed=8, max_audio_length_ms=400, parse_special=False)
    np.testing.assert_array_equal(pcm16(out / "0004.wav"), plain.to_int16())
    rc, _, err = run(["-m", model, "--output-dir", tmp_path / "out2", "--json-input", "--seed", "5", "-q",
                      "--parse-special", *CAP], stdin=stdin)
    assert rc == 0, err
    assert not np.array_equal(pcm16(tmp_path / "out2" / "0004.wav"), plain.to_int16())


@pytest.mark.parametrize("line, pattern", [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"text": ""}', 'line 2: "text" must be a non-empty string'),
    ('{"text": "x", "speaker": -1}', 'line 2: "speaker" must be an integer >= 0'),
    ('{"text": "x", "speaker": 1e99}', 'line 2: "speaker" must be an integer >= 0'),
    ('{"text": "x", "output_file": "/etc/x.wav"}', "line 2: \"output_file\" must be a relative path"),
    ('{"text": "x", "output_file": "../x.wav"}', "line 2: \"output_file\" must be a relative path"),
    ('{"text": "x", "output_file": "x.txt"}', "line 2: unknown audio file type"),
    ('{"text": "x", "colour": "red"}', "line 2: unknown key 'colour'"),
])
def test_output_dir_bad_json_line_is_refused_before_any_work(run, model, tmp_path, line, pattern):
    rc, _, err = run(["-m", model, "--output-dir", tmp_path / "out", "--json-input", *CAP],
                     stdin='{"text": "Fine."}\n' + line + "\n")
    assert_one_line_error(rc, err, 1, pattern)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
