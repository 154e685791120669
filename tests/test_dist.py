"""Packaging: one version, the import cost, pycsm.convert as a module, the native library lookup
per platform (monkeypatched: nothing here runs Windows or macOS), the cibuildwheel command reader.

The wheel itself (build, repair, install without build tools, speak) is .ci/wheel's job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import pycsm
from pycsm import _native

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import cibw_command  # noqa: E402

sys.path.pop(0)


def test_one_version():
    """pyproject takes the version from pycsm/__init__.py; the native library was built with it."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    provider = meta["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["input"] == "pycsm/__init__.py"
    line = re.search(r'^__version__ = "(\d+\.\d+\.\d+)"$', (REPO / "pycsm/__init__.py").read_text(), re.M)
    assert line and line[1] == pycsm.__version__
    assert _native.lib.csm_version().decode() == pycsm.__version__


def test_import_loads_no_converter_or_torch():
    code = ("import json, sys, pycsm; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('safetensors', 'torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == []


def test_convert_is_the_module():
    assert isinstance(pycsm.convert, types.ModuleType)
    assert pycsm.convert.__name__ == "pycsm.convert"
    assert callable(pycsm.convert.convert) and callable(pycsm.convert.main)


def test_convert_without_safetensors_says_which_extra(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` now fails
    with pytest.raises(ImportError, match=r"pycsm-tts\[convert\]"):
        pycsm.convert.convert(tiny_dir / "checkpoint", tmp_path / "out.gguf", "f32")


def test_typed_and_licensed():
    assert (REPO / "pycsm" / "py.typed").is_file()
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "pycsm-tts" and meta["license"] == "Apache-2.0"
    assert all((REPO / f).is_file() for f in meta["license-files"])
    assert "Apache License" in (REPO / "LICENSE").read_text()


# ---------------------------------------------------------------------------------------------
# native library lookup, per platform
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_libggml(tmp_path, monkeypatch):
    """A libggml package laid out as its wheels are: bin/ (Windows) or lib64/ (Linux) or lib/."""
    root = tmp_path / "libggml"
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.setitem(sys.modules, "libggml", types.SimpleNamespace(__file__=str(root / "__init__.py")))
    monkeypatch.delenv("PYCSM_LIBRARY", raising=False)
    return root


def _calls(monkeypatch):
    calls = {"dll_dirs": [], "cdll": []}
    monkeypatch.setattr(_native.os, "add_dll_directory", lambda d: calls["dll_dirs"].append(d) or d,
                        raising=False)
    monkeypatch.setattr(_native.ctypes, "CDLL", lambda path, mode=0: calls["cdll"].append((path, mode)))
    monkeypatch.setattr(_native, "_dll_directories", [])
    return calls


def test_lookup_windows(fake_libggml, monkeypatch):
    (fake_libggml / "bin").mkdir()
    (fake_libggml / "lib").mkdir()
    calls = _calls(monkeypatch)
    _native._prepare_ggml("win32")
    assert calls["dll_dirs"] == [str(fake_libggml / "bin"), str(fake_libggml / "lib")]
    assert calls["cdll"] == []
    assert _native._dll_directories == calls["dll_dirs"]  # kept alive
    first = _native._library_candidates("win32")[0]
    assert first == Path(_native.__file__).resolve().parent / "csm.dll"


def test_lookup_macos(fake_libggml, monkeypatch):
    (fake_libggml / "lib").mkdir()
    (fake_libggml / "lib" / "libggml.0.dylib").write_bytes(b"")
    calls = _calls(monkeypatch)
    _native._prepare_ggml("darwin")
    assert calls == {"dll_dirs": [], "cdll": []}  # the dylib's @loader_path rpath finds ggml
    candidates = _native._library_candidates("darwin")
    assert candidates[0] == Path(_native.__file__).resolve().parent / "libcsm.dylib"
    assert all(p.name == "libcsm.dylib" for p in candidates)


def test_lookup_linux(fake_libggml, monkeypatch):
    lib64 = fake_libggml / "lib64"
    lib64.mkdir()
    for name in ("libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0"):
        (lib64 / name).write_bytes(b"")
    calls = _calls(monkeypatch)
    _native._prepare_ggml("linux")
    assert calls["dll_dirs"] == []
    assert [Path(p).name for p, _ in calls["cdll"]] == ["libggml-base.so.0", "libggml-cpu.so.0", "libggml.so.0"]
    assert all(mode == _native.ctypes.RTLD_GLOBAL for _, mode in calls["cdll"])
    assert _native._library_candidates("linux")[0].name == "libcsm.so"


def test_lookup_without_libggml(monkeypatch):
    monkeypatch.setitem(sys.modules, "libggml", None)
    calls = _calls(monkeypatch)
    _native._prepare_ggml("win32")
    _native._prepare_ggml("linux")
    assert calls == {"dll_dirs": [], "cdll": []}


def test_library_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PYCSM_LIBRARY", str(tmp_path / "x.dll"))
    assert _native._library_candidates("win32") == [tmp_path / "x.dll"]


# ---------------------------------------------------------------------------------------------
# cibuildwheel commands as tools/build_wheel.sh and tools/check_wheel.sh run them
# ---------------------------------------------------------------------------------------------

def test_cibw_commands():
    repair = cibw_command.command("repair-wheel-command", "linux", {"wheel": "raw/a b.whl", "dest_dir": "out"})
    assert repair == "auditwheel repair --exclude 'libggml*' -w out 'raw/a b.whl'"
    mac = cibw_command.command("repair-wheel-command", "macos", {"wheel": "w.whl", "dest_dir": "d",
                                                                 "delocate_archs": "arm64"})
    assert "--exclude libggml" in mac and "{" not in mac
    test = cibw_command.command("test-command", "windows", {"project": "C:/src/pycsm"})
    assert test == "python C:/src/pycsm/tools/wheel_smoke.py"
    with pytest.raises(SystemExit, match="no no-such-key"):
        cibw_command.command("no-such-key", "linux", {})


def test_tiny_gguf_without_torch(tmp_path):
    """tools/tiny_gguf.py (the wheel checks' model) writes a loadable q8_0 file in a process that
    never imports torch, transformers or llama-models."""
    out = tmp_path / "tiny.gguf"
    probe = ("import sys, runpy; sys.argv = [sys.argv[1], sys.argv[2]]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
             "    assert not e.code, e.code\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'llama_models'))\n"
             "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", probe, str(REPO / "tools" / "tiny_gguf.py"), str(out)], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    with pycsm.Model(out, device="cpu") as m:
        assert m.file_type == "q8_0"
        assert m.hparams.bb_d_model == 128 and m.hparams.text_vocab_size == 128256
