import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 (converted once, then cached)."""
    from circuit_atlas.compute.models import load_model

    return load_model("smollm2")
