"""Smoke test of an installed pycsm-tts wheel, run from outside the checkout.

    python tools/wheel_smoke.py            # cibuildwheel's test-command; tools/check_wheel.sh

Checks, in a scratch folder: `import pycsm` comes from the installed wheel (not this checkout) and
loads neither safetensors nor torch; the version agrees across the wheel's metadata,
`pycsm.__version__`, `pycsm --version` and the native library; the wheel ships LICENSE and py.typed;
then a tiny random-weight GGUF is written (tools/tiny_gguf.py) and `pycsm info` and a synthesis to a
WAV file run through the installed `pycsm` command. Written in Python so that the same test runs
under cmd.exe, macOS and the manylinux containers. Exits non-zero with the first failed check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECONDS = 0.4          # --max-audio-length: a random-weight model never stops by itself
SAMPLE_RATE = 24000


def run(cmd: list[str], cwd: Path) -> str:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"wheel check failed: {what}")
    print("ok:", what, flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        probe = ("import json, sys, pycsm; "
                 "print(json.dumps({'file': pycsm.__file__, 'version': pycsm.__version__, "
                 "'native': pycsm._native.lib.csm_version().decode(), "
                 "'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('safetensors', 'torch'))}))")
        info = json.loads(run([sys.executable, "-c", probe], work).strip().splitlines()[-1])
        check(REPO not in Path(info["file"]).resolve().parents, f"pycsm is the installed one ({info['file']})")
        check(not info["loaded"], f"`import pycsm` loads no safetensors/torch (loaded: {info['loaded']})")

        dist = metadata.distribution("pycsm-tts")
        check(dist.version == info["version"] == info["native"],
              f"one version: metadata {dist.version}, pycsm.__version__ {info['version']}, "
              f"csm_version() {info['native']}")
        names = {Path(str(f)).name for f in dist.files or []}
        check({"LICENSE", "py.typed"} <= names, "the wheel ships LICENSE and pycsm/py.typed")
        check(dist.metadata["License-Expression"] == "Apache-2.0", "License-Expression: Apache-2.0")

        exe = shutil.which("pycsm")
        check(exe is not None, f"the `pycsm` command is on PATH ({exe})")
        out = run([exe, "--version"], work)
        check(info["version"] in out, f"`pycsm --version` says {info['version']}")

        gguf = work / "tiny.gguf"
        run([sys.executable, str(HERE / "tiny_gguf.py"), str(gguf)], work)
        out = run([exe, "info", str(gguf)], work)
        check("q8_0" in out.lower(), "`pycsm info tiny.gguf` reads the file (quant q8_0)")

        wav = work / "hello.wav"
        run([exe, "-m", str(gguf), "Hello from the wheel.", "-o", str(wav), "--seed", "1",
             "--max-audio-length", str(SECONDS)], work)
        import numpy as np
        import soundfile as sf

        samples, rate = sf.read(str(wav), dtype="float32")
        check(rate == SAMPLE_RATE and len(samples) == round(SECONDS * SAMPLE_RATE),
              f"hello.wav: {len(samples)} samples at {rate} Hz")
        check(bool(np.isfinite(samples).all()) and float(np.abs(samples).max()) > 0.0,
              "hello.wav holds finite, non-silent audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
