import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 (converted once, then cached)."""
    from circuit_atlas.compute.models import load_model

    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One ``circuit-atlas demo --limit 1`` for every test that reads a demo lake:
    (its lake folder, what it printed). A test that writes to the lake works on a copy
    (``shutil.copytree``)."""
    from click.testing import CliRunner

    from circuit_atlas.cli import cli

    root = tmp_path_factory.mktemp("demo") / "demo-lake"
    result = CliRunner().invoke(cli, ["demo", "--lake", str(root), "--limit", "1",
                                      "--label-neurons", "1"])
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster (two worker processes) shared by the Dask tests."""
    from circuit_atlas.etl.clusters import dask_client

    with dask_client(n_workers=2, memory_limit="2GB", echo=None) as c:
        yield c


@pytest.fixture(scope="session")
def slurm():
    """A real SLURM controller on this machine: the one running, or the single node
    scripts/slurm starts (and stops again at the end, by PID)."""
    import os
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "slurm")
    if subprocess.run(["bash", script, "status"], capture_output=True).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM answers here and starting one needs root (bash scripts/slurm "
                    "start)")
    started = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    subprocess.run(["bash", script, "stop"], capture_output=True)
