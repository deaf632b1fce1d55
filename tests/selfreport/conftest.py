import pytest


@pytest.fixture(scope="module")
def planted_lake(tmp_path_factory):
    """A lake with the activation statistics of the tiny model whose L1/N7 and N9 fire
    at one token each (N11 and N13 negative there), exactly 0 elsewhere."""
    from tests.labeling.test_scoring import planted_lake

    return str(planted_lake(tmp_path_factory.mktemp("selfreport"))[1].root)
