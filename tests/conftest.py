"""Shared pytest fixtures."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_cache import cached_build

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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # older sources' fixtures are removed (~0.4 GB each)
    return cached_build("tiny", digest, _load_make_tiny().build, prune=True)


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """The tiny model's transformers reference outputs (reference.npz)."""
    import numpy as np

    return dict(np.load(tiny_dir / "reference.npz"))


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """benchmarks/make_model.py's tiny model as f16, q8_0 and q4_k files (random weights, no
    reference): its depth rows of 64 and backbone rows of 128 make the
    q4_k file part Q4_K (pycsm's kernel), part Q4_0 (ggml's)."""
    folder = tmp_path_factory.mktemp("tiny-quant")
    out = {}
    for outtype in ("f16", "q8_0", "q4_k"):
        path = folder / f"tiny-{outtype}.gguf"
        subprocess.run([sys.executable, str(REPO / "benchmarks/make_model.py"), "--size", "tiny", "--outtype", outtype,
                        "-o", str(path), "--cache-dir", str(folder), "--threads", "2"], check=True, capture_output=True)
        out[outtype] = path
    return out
