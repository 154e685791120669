"""The default thread count is the CPUs this process may use (its affinity mask; a cgroup CPU quota
lowers it further), not the machine's cores: more threads than usable CPUs spin at ggml's barriers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from pycsm.generator import Generator
from pycsm.model import Model, set_log_callback
lines = []
set_log_callback(lambda level, text: lines.append(text))
with Model(sys.argv[1]) as m:
    for n in (0, 4):
        with Generator(m, n_threads=n):
            pass
print([l.strip() for l in lines if l.startswith("context:")])
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux affinity masks")
def test_default_threads_follow_the_affinity_mask(tiny_dir):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable CPUs to see the difference")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dir / "tiny-f32.gguf")], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    contexts = eval(out.strip().splitlines()[-1])
    assert len(contexts) == 2, out
    # one CPU in the mask: the default and an explicit 4 both run 1 thread
    assert all(c.startswith("context: 1 threads") for c in contexts), contexts
