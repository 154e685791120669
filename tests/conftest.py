"""Shared pytest fixtures."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE_TINY = REPO / "tests" / "reference" / "make_tiny.py"
# The fixture is rebuilt whenever one of these changes.
FIXTURE_SOURCES = [MAKE_TINY, REPO / "pycsm" / "convert.py", REPO / "pycsm" / "gguf_writer.py"]


def _load_make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", MAKE_TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The seeded tiny CSM model: checkpoint/, tiny-f32.gguf, tiny-f16.gguf, reference.npz.

    Cached in <repo>/.fixture-cache/tiny-<hash of its sources>; built in a temporary folder and
    renamed into place, so a cache folder that exists is complete.
    """
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in FIXTURE_SOURCES)).hexdigest()[:16]
    cache = REPO / ".fixture-cache"
    final = cache / f"tiny-{digest}"
    if final.exists():
        return final
    cache.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"tmp-tiny-{digest}-", dir=cache))
    tmp.chmod(0o755)
    try:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _load_make_tiny().build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another session finished first: use its copy
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in cache.glob("tiny-*"):  # fixtures of older sources (~0.4 GB each)
        if stale != final and not stale.name.startswith("tmp-"):
            shutil.rmtree(stale, ignore_errors=True)
    return final
