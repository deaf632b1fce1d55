import contextlib
import fcntl
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # the cores shared out among the pytest-xdist workers (torch's spinning OpenMP
    # threads would otherwise fight over them); subprocesses a test starts inherit it
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 (converted once, then cached)."""
    from circuit_atlas.compute.models import load_model

    return load_model("smollm2", dtype="float32")


@contextlib.contextmanager
def across_workers(tmp_path_factory, name: str):
    """A folder every pytest-xdist worker of this run shares, held under an exclusive
    lock: the first worker there builds what it holds, the others wait and reuse it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder above the workers' own
    folder = base / f"shared-{name}"
    folder.mkdir(exist_ok=True)
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One ``circuit-atlas demo --limit 1`` for every test that reads a demo lake, in
    every worker: (its lake folder, what it printed). A test that writes to the lake
    works on a copy (``shutil.copytree``)."""
    from click.testing import CliRunner

    from circuit_atlas.cli import cli

    with across_workers(tmp_path_factory, "demo") as folder:
        root, printed = folder / "demo-lake", folder / "printed.txt"
        if not printed.exists():
            result = CliRunner().invoke(cli, ["demo", "--lake", str(root), "--limit", "1",
                                              "--label-neurons", "1"])
            assert result.exit_code == 0, result.output
            printed.write_text(result.output, encoding="utf-8")
    return root, printed.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster (two worker processes) shared by the Dask tests."""
    from circuit_atlas.etl.clusters import dask_client

    with dask_client(n_workers=2, memory_limit="2GB", echo=None) as c:
        yield c


SLURM = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "slurm")


@pytest.fixture(scope="session")
def slurm_controller(tmp_path_factory):
    """A real SLURM controller on this machine: the one running, or the single node
    scripts/slurm starts (stopped again when the whole run ends, by PID)."""
    import subprocess

    with across_workers(tmp_path_factory, "slurm") as folder:
        if subprocess.run(["bash", SLURM, "status"], capture_output=True).returncode == 0:
            return
        if os.geteuid() != 0:
            pytest.skip("no SLURM answers here and starting one needs root (bash "
                        "scripts/slurm start)")
        started = subprocess.run(["bash", SLURM, "start"], capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr
        (folder / "started").touch()


@pytest.fixture
def slurm(slurm_controller, tmp_path_factory):
    """The single SLURM node, to one test at a time (its jobs would otherwise wait on
    another worker's for the node's cores)."""
    with across_workers(tmp_path_factory, "slurm"):
        yield


def pytest_sessionfinish(session):
    """The SLURM this run started is stopped by the process that ran the session (the
    pytest-xdist controller, after every worker is done)."""
    import subprocess

    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and (factory.getbasetemp() / "shared-slurm" / "started").exists():
        subprocess.run(["bash", SLURM, "stop"], capture_output=True)
