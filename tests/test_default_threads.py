"""The default thread count is the CPUs this process may use (its affinity mask; a cgroup CPU quota
lowers it further), not the machine's cores: more threads than usable CPUs spin at ggml's barriers.
For the same reason the default count steps down while other processes keep the CPUs busy."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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


BUSY_SCRIPT = r"""
import os, subprocess, sys
import numpy as np
from pycsm.generator import Generator
from pycsm.model import Model, set_log_callback
lines = []
set_log_callback(lambda level, text: lines.append(text.strip()))
n_cpus = len(os.sched_getaffinity(0))
# as many spinning processes as CPUs: our threads get about half of the CPU time they ask for
spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_cpus)]
codes, changes = {}, {}
try:
    with Model(sys.argv[1]) as m:
        prompt = np.load(sys.argv[2])
        for n in (0, n_cpus):  # the default (adaptive) count, then the same count fixed
            del lines[:]
            with Generator(m, n_threads=n) as g:
                r = g.generate(prompt, temperature=0.9, top_k=50, seed=5, max_frames=60, stop_at_eos=False)
            codes[n] = r.codes
            changes[n] = [l for l in lines if l.startswith("threads:")]
finally:
    for p in spin:
        p.kill()
print(repr((n_cpus, changes[0], changes[n_cpus], bool(np.array_equal(codes[0], codes[n_cpus])))))
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux affinity masks")
def test_default_threads_step_down_beside_busy_processes(tiny_dir, tmp_path, ref):
    """ggml's workers spin at every barrier, so beside busy processes the default thread count drops
    (the pool of fewer threads takes over between graphs); a fixed count stays; either way the codes
    are the same (each output row is computed by one thread in a fixed order)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 usable CPUs: one thread never steps down")
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, ref["prompt_plain"])
    out = subprocess.run([sys.executable, "-c", BUSY_SCRIPT, str(tiny_dir / "tiny-f16.gguf"), str(prompt)],
                         capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    n_cpus, adaptive, fixed, same = eval(out.strip().splitlines()[-1])
    assert f"threads: {n_cpus} -> {n_cpus - 1}" in adaptive, adaptive
    assert fixed == [], fixed
    assert same
