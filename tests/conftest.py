import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 (converted once, then cached)."""
    from circuit_atlas.compute.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster (two worker processes) shared by the Dask tests."""
    from circuit_atlas.etl.clusters import dask_client

    with dask_client(n_workers=2, memory_limit="2GB", echo=None) as c:
        yield c
