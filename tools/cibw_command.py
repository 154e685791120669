"""Print one of pyproject.toml's cibuildwheel commands with its placeholders filled in.

    python tools/cibw_command.py KEY PLATFORM [NAME=VALUE ...]
    python tools/cibw_command.py repair-wheel-command linux wheel=raw/x.whl dest_dir=dist

KEY is read from [tool.cibuildwheel.PLATFORM], else from [tool.cibuildwheel]; each {NAME} becomes
VALUE, quoted for the shell. tools/build_wheel.sh and tools/check_wheel.sh run the printed command, so the repair and test
commands the hosted CI runs are the ones exercised on this machine, not a copy of them.
"""

from __future__ import annotations

import shlex
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def command(key: str, platform: str, values: dict[str, str]) -> str:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["cibuildwheel"]
    cmd = config.get(platform, {}).get(key, config.get(key))
    if cmd is None:
        raise SystemExit(f"no {key} in [tool.cibuildwheel.{platform}] or [tool.cibuildwheel]")
    if isinstance(cmd, list):
        cmd = " && ".join(cmd)
    for name, value in values.items():
        cmd = cmd.replace("{" + name + "}", shlex.quote(value))
    return cmd


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[2:]):
        raise SystemExit(__doc__.split("\n\n")[1])
    print(command(argv[0], argv[1], dict(a.split("=", 1) for a in argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
