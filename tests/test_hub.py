"""Finding csm-1b-{quant}.gguf through huggingface_hub: a Hugging Face cache laid out as
huggingface_hub writes it (blobs/, snapshots/<commit>/, refs/main) holding the tiny model, used with
HF_HOME + HF_HUB_OFFLINE=1. huggingface_hub reads those variables when it is imported, so the
environment-driven cases run in a fresh `python` process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pycsm
from pycsm.hub import DEFAULT_REPO, QUANTS, check_quant, model_filename

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def env(hf_home: Path, **extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", **extra)
    return e


def python(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(hf_home),
                          timeout=120)


def pycsm_cmd(args, hf_home: Path, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pycsm", *map(str, args)], capture_output=True, text=True,
                          env=env(hf_home), cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def hf_home(tiny_dir, tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds cstr/csm-1b-GGUF's csm-1b-q8_0.gguf (the tiny model)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / ("models--" + DEFAULT_REPO.replace("/", "--"))
    blob = repo / "blobs" / "a3f1c0ffee0123456789abcdef0123456789abcdef0123456789abcdef012345"
    blob.parent.mkdir(parents=True)
    src = tiny_dir / "tiny-f16.gguf"
    try:
        os.link(src, blob)
    except OSError:
        import shutil

        shutil.copyfile(src, blob)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / "csm-1b-q8_0.gguf").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture()
def empty_home(tmp_path) -> Path:
    return tmp_path / "empty_hf_home"


def cached_file(home: Path) -> Path:
    return home / "hub" / "models--cstr--csm-1b-GGUF" / "snapshots" / COMMIT / "csm-1b-q8_0.gguf"


def test_quant_names():
    assert QUANTS == ("f16", "q8_0", "q4_k")
    assert [model_filename(q) for q in QUANTS] == ["csm-1b-f16.gguf", "csm-1b-q8_0.gguf", "csm-1b-q4_k.gguf"]
    assert check_quant("Q8_0") == "q8_0"
    for bad in ["q5", "q4_0", "", None]:
        with pytest.raises(ValueError, match="f16, q8_0, q4_k"):
            check_quant(bad)
    with pytest.raises(ValueError, match="f16, q8_0, q4_k"):
        pycsm.CSM.from_pretrained(quant="q5_k")


def test_from_pretrained_in_process_from_a_cache_dir(hf_home):
    with pycsm.CSM.from_pretrained(quant="q8_0", cache_dir=hf_home / "hub", local_files_only=True,
                                   n_threads=1) as tts:
        assert tts.path == cached_file(hf_home)
        assert tts.model.hparams.bb_n_layers == 2
    with pytest.raises(pycsm.CSMError, match="--model"):
        pycsm.CSM.from_pretrained(quant="q4_k", cache_dir=hf_home / "hub", local_files_only=True)


def test_offline_cache_hit(hf_home):
    p = python("import pycsm\n"
               "with pycsm.CSM.from_pretrained(n_threads=1) as t:\n"
               "    print(t.path); print(t.model.hparams.bb_d_model)\n"
               "from pycsm.hub import download; print(download('q8_0'))", hf_home)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split()
    assert lines == [str(cached_file(hf_home)), "128", str(cached_file(hf_home))]


def test_offline_cache_miss_names_the_way_out(hf_home, empty_home):
    for home, quant in [(empty_home, "q8_0"), (hf_home, "f16")]:
        p = python(f"import pycsm\npycsm.CSM.from_pretrained(quant={quant!r})", home)
        assert p.returncode == 1
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("pycsm.errors.CSMError: ")
        assert f"csm-1b-{quant}.gguf" in last and "HF_HUB_OFFLINE" in last and "--model PATH" in last


def test_cli_info_resolves_a_quant_name(hf_home):
    p = pycsm_cmd(["info", "q8_0"], hf_home)
    assert p.returncode == 0, p.stderr
    assert str(cached_file(hf_home)) in p.stdout and "bb_n_layers" in p.stdout


def test_cli_offline_without_cache(empty_home, tmp_path):
    p = pycsm_cmd(["Hello.", "-o", tmp_path / "x.wav"], empty_home)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pycsm: error: ") and "--model" in lines[0], p.stderr
    p = pycsm_cmd(["Hello.", "--quant", "q3"], empty_home)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    assert not (tmp_path / "x.wav").exists()


def test_cli_speaks_with_the_cached_model(hf_home, tmp_path):  # codec
    out = tmp_path / "hub.wav"
    p = pycsm_cmd(["Hello.", "-o", out, "--quant", "q8_0", "--max-audio-length", "0.4", "--threads", "1", "-q"],
                  hf_home)
    assert p.returncode == 0, p.stderr
    import soundfile as sf

    assert sf.info(out).frames == 5 * 1920


# ---------------------------------------------------------------------------------------------
# crispasr's model names (-m csm --auto-download) against a fake hub on 127.0.0.1
# ---------------------------------------------------------------------------------------------

class FakeHub:
    """A hub serving one repository's files over HTTP on 127.0.0.1, as huggingface_hub expects them
    (HEAD with X-Repo-Commit / ETag / Content-Length, then GET); it records every request."""

    def __init__(self, repo: str, files: dict):
        import hashlib
        import http.server
        import threading

        self.requests = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path))
                prefix = f"/{repo}/resolve/"
                name = self.path.split("?")[0][len(prefix):].split("/", 1)[-1] if self.path.startswith(prefix) \
                    else None
                if name not in files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                data = files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._serve(False)

            def do_GET(self):
                self._serve(True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_hub(tiny_dir):
    hub = FakeHub(DEFAULT_REPO, {"csm-1b-q4_k.gguf": (tiny_dir / "tiny-f16.gguf").read_bytes()})
    yield hub
    hub.close()


def online_env(hf_home: Path, endpoint: str) -> dict:
    e = env(hf_home, HF_ENDPOINT=endpoint)
    del e["HF_HUB_OFFLINE"]
    return e


def crispasr_cmd(args, e) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pycsm", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=120)


def test_model_names():
    from pycsm.hub import parse_model_name

    for name in ["csm", "CSM", "csm-1b", "sesame", "sesame-csm", "csm-tts", "csm_tts"]:
        assert parse_model_name(name) == (True, None)
        assert parse_model_name(f"{name}:Q4_K") == (True, "q4_k")
    assert parse_model_name("model.gguf") == (False, None)
    assert parse_model_name("whisper:q8_0") == (False, None)
    with pytest.raises(ValueError, match="unknown quant"):
        parse_model_name("csm:q5")


def test_auto_download_from_a_fake_hub_then_offline(fake_hub, tmp_path):  # codec
    home = tmp_path / "home"
    out = tmp_path / "fox.wav"
    args = ["-m", "csm:q4_k", "--tts", "The quick brown fox.", "--tts-output", out, "--seed", "3", "-t", "1",
            "--max-audio-length", "0.4", "-q"]
    # without --auto-download: a clear error naming the command that downloads it, no request made
    p = crispasr_cmd(args, online_env(home, fake_hub.url))
    assert p.returncode == 1 and fake_hub.requests == []
    assert "csm-1b-q4_k.gguf" in p.stderr and "--auto-download" in p.stderr and "-m PATH" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # with it: downloaded into the cache (the model card's second command)
    p = crispasr_cmd([*args, "--auto-download"], online_env(home, fake_hub.url))
    assert p.returncode == 0, p.stderr
    assert ("GET", f"/{DEFAULT_REPO}/resolve/main/csm-1b-q4_k.gguf") in fake_hub.requests
    cached = home / "hub" / "models--cstr--csm-1b-GGUF" / "snapshots" / COMMIT / "csm-1b-q4_k.gguf"
    assert cached.is_file()
    first = out.read_bytes()
    # then offline, from the cache: the same file, without a request
    n = len(fake_hub.requests)
    for name in ["sesame-csm:q4_k", "csm-tts"]:
        out.unlink()
        p = crispasr_cmd([*args[:1], name, *args[2:], *(["--quant", "q4_k"] if ":" not in name else [])],
                         env(home))
        assert p.returncode == 0, p.stderr
        assert out.read_bytes() == first
    assert len(fake_hub.requests) == n
    # crispasr's --hf-repo REPO:FILE implies --auto-download
    home2 = tmp_path / "home2"
    out.unlink()
    p = crispasr_cmd(["-hfr", f"{DEFAULT_REPO}:csm-1b-q4_k.gguf", *args[2:]], online_env(home2, fake_hub.url))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == first and len(fake_hub.requests) > n
    p = crispasr_cmd(["--hf-file", "other.gguf", *args[2:]], online_env(home2, fake_hub.url))
    assert p.returncode == 2 and "csm-1b-{f16,q8_0,q4_k}.gguf" in p.stderr


def test_an_unreachable_hub_fails_at_once(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = crispasr_cmd(["-m", "csm", "--auto-download", "--tts", "Hi.", "--tts-output", tmp_path / "x.wav"],
                     online_env(tmp_path / "home", f"http://127.0.0.1:{port}"))
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    # the probe's error, not the hub client's after its retries (which say "cannot find the requested files")
    assert len(lines) == 1 and "cannot reach the Hugging Face hub at http://127.0.0.1" in lines[0], p.stderr
    assert not (tmp_path / "x.wav").exists()
