"""Test helper: model fixtures built once and kept in <repo>/.fixture-cache, keyed by a digest of
what builds them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".fixture-cache"


def cached_build(kind: str, digest: str, build, prune: bool = False) -> Path:
    """.fixture-cache/<kind>-<digest>, made by build(folder) in a temporary folder and renamed into
    place, so a cache folder that exists is complete. prune: remove <kind>-* folders of other digests."""
    final = CACHE / f"{kind}-{digest}"
    if final.exists():
        return final
    CACHE.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{kind}-{digest}-", dir=CACHE))
    tmp.chmod(0o755)
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another session finished first: use its copy
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if prune:
        for stale in CACHE.glob(f"{kind}-*"):
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final
