"""Run a benchmark script in a subprocess and sample the RSS of its process tree."""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def measure(script: str, argv: list[str], cwd: str, stdout=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, the process and all its children, Dask workers
    included, sampled every 50 ms) of ``python script argv`` (its output to ``stdout``,
    an open file, where given)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=cwd, stdout=stdout)
    peak, p = 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                rss = sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proc.wait()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{script} {' '.join(argv)} failed with status {proc.returncode}")
    return time.perf_counter() - t0, peak / 1e9
