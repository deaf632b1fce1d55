"""Run a benchmark script in a subprocess and sample the RSS of its process tree."""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def measure(script: str, argv: list[str], cwd: str, stdout=None, per_process: bool = False
            ) -> tuple[float, ...]:
    """Wall seconds and peak RSS (GB, the process and all its children, Dask workers
    included, sampled every 50 ms) of ``python script argv`` (its output to ``stdout``,
    an open file, where given); ``per_process``: also the peak of the largest single
    process of the tree (a Dask worker's, against its memory limit)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=cwd, stdout=stdout)
    peak, one, p = 0, 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak, one
        while proc.poll() is None:
            try:
                rss = [c.memory_info().rss for c in [p, *p.children(recursive=True)]]
                peak, one = max(peak, sum(rss)), max(one, *rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proc.wait()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{script} {' '.join(argv)} failed with status {proc.returncode}")
    wall = time.perf_counter() - t0
    return (wall, peak / 1e9, one / 1e9) if per_process else (wall, peak / 1e9)
