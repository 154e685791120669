"""Frames per second of `pycsm --output-dir` (lines generated `--batch` at a time) against one
`generate` call per line, on one loaded model in one process.

    python3 benchmarks/batch_lines.py                         # /work/models/q8_0.gguf or benchmarks/models/
    python3 benchmarks/batch_lines.py --model csm-1b-q8_0.gguf --lines 8 --frames 20 --repeat 2

Both sides write every line's WAV file, as the command line does. `--output-dir` runs the command
line's own batch loop (`pycsm.cli._run_batches`) on the loaded model; the other side calls
`CSM.generate` once per line. The two alternate (A, B, A, B...) so that both see the same machine
load; the result is the ratio of their medians. Random-weight files never end an utterance, so every
line is exactly `--frames` frames long on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pycsm import CSM, GenerationOptions  # noqa: E402
from pycsm import cli  # noqa: E402


def default_model() -> Path:
    for p in (Path("/work/models/q8_0.gguf"), REPO / "benchmarks" / "models" / "csm-1b-q8_0.gguf"):
        if p.is_file():
            return p
    raise SystemExit("no full-size q8_0 file: make one with benchmarks/make_model.py --size full --outtype q8_0, "
                     "or pass --model")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--frames", type=int, default=20, help="frames per line (80 ms each)")
    ap.add_argument("--batch", type=int, default=cli.DEFAULT_BATCH)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    model = a.model or default_model()
    texts = [f"This is line number {i} of the batch, spoken on its own." for i in range(a.lines)]
    opts = GenerationOptions(seed=1, max_audio_length_ms=a.frames * 80, parse_special=False)
    frames = a.lines * a.frames
    args = cli._speak_parser().parse_args(["--output-dir", "x", "--batch", str(a.batch), "-q"])
    lines = [cli._Line(i + 1, t) for i, t in enumerate(texts)]

    t0 = time.perf_counter()
    with CSM(model, n_threads=a.threads) as tts, tempfile.TemporaryDirectory() as tmp:
        print(f"{model} ({tts.model.file_type}), loaded in {time.perf_counter() - t0:.1f} s; {a.lines} lines of "
              f"{a.frames} frames, batch {a.batch}, {a.threads} threads")
        tts.generate("Warm up.", options=opts, max_audio_length_ms=160)
        per_call, batched = [], []
        for r in range(a.repeat):
            t = time.perf_counter()
            for i, text in enumerate(texts):
                tts.generate(text, options=opts, seed=1 + i).save(Path(tmp) / f"g{i}.wav")
            per_call.append(frames / (time.perf_counter() - t))
            for line in lines:
                line.output = Path(tmp) / f"{line.number:04d}.wav"
            t = time.perf_counter()
            cli._run_batches(tts, lines, {}, opts, args)
            batched.append(frames / (time.perf_counter() - t))
            print(f"run {r + 1}: {a.lines} generate calls {per_call[-1]:.2f} frames/s, "
                  f"--output-dir {batched[-1]:.2f} frames/s")
    g, b = statistics.median(per_call), statistics.median(batched)
    print(f"median: generate x{a.lines} {g:.2f} frames/s, --output-dir --batch {a.batch} {b:.2f} frames/s: "
          f"{b / g:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
