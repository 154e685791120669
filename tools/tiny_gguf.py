"""Write a tiny random-weight CSM GGUF with whichever pycsm is importable: no torch, no download.

    python tools/tiny_gguf.py OUT.gguf [--outtype f16|q8_0|q4_k] [--seed N]

The wheel checks (tools/build_wheel.sh, cibuildwheel's test-command) speak from this file. It is
benchmarks/make_model.py's "tiny" size (2 backbone layers of width 128) with the synthetic
byte-level vocabulary, so it needs only numpy and pycsm; q8_0 / q4_k go through pycsm's own
quantiser. pycsm is imported before make_model, which puts the checkout first on sys.path: an
installed wheel under test stays the pycsm that writes (and later reads) the file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pycsm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import make_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--outtype", choices=make_model.OUTTYPES, default="q8_0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        make_model.make("tiny", args.outtype, args.output, args.seed, cache_dir=Path(cache), force=True,
                        threads=1, vocab="synthetic", log=lambda msg: print(msg, file=sys.stderr))
    print(f"{args.output} (pycsm {pycsm.__version__} from {Path(pycsm.__file__).parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
