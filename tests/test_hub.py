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
