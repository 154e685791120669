#!/usr/bin/env bash
# Install a built wheel the way a user would and run pyproject.toml's cibuildwheel test-command
# (tools/wheel_smoke.py: import cost, version, LICENSE/py.typed, `pycsm info` and a synthesis from a
# tiny GGUF written on the spot).
#
#   tools/check_wheel.sh WHEEL
#
# The virtual environment is fresh and the PATH holds nothing but its bin/ and a folder of links to
# `env`, `bash` and the like: no compiler, CMake or ninja can be found, and `--only-binary :all:`
# keeps pip from building anything, so the wheel and its dependencies must all be prebuilt. pip's
# download cache is the user's ordinary one (reused between runs). torch is never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEEL=$(realpath "${1:?usage: tools/check_wheel.sh WHEEL}")

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
mkdir "$TMP/bin"
for tool in env bash sh ls cat rm mkdir dirname uname; do
    ln -s "$(command -v "$tool")" "$TMP/bin/$tool"
done
CLEAN_PATH=$TMP/venv/bin:$TMP/bin

for tool in cc gcc g++ c++ clang cmake ninja make; do
    if PATH=$CLEAN_PATH command -v "$tool" >/dev/null; then
        echo "check_wheel: $tool is reachable on the clean PATH" >&2
        exit 1
    fi
done
echo "== no compiler, cmake or ninja on PATH=$CLEAN_PATH"

run_clean() { env -i HOME="$HOME" PATH="$CLEAN_PATH" LANG=C.UTF-8 "$@"; }
run_clean python -m pip install -q --disable-pip-version-check --only-binary :all: "$WHEEL"
run_clean python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(pycsm-tts|libggml-python|torch|safetensors) " || true

# the import cost a user sees (the last line is pycsm's own, cumulative, in microseconds)
run_clean python -X importtime -c "import pycsm" 2>&1 | tail -n 1

TEST=$(python3 tools/cibw_command.py test-command linux project="$REPO")
echo "+ $TEST"
cd "$TMP"
run_clean bash -c "$TEST"
echo "== the wheel installs and speaks without build tools"
