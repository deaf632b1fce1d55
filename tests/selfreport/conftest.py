import pytest


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model folder, lake root): the tiny model whose L1/N7 and N9 fire at one token
    each (N11 and N13 negative there), exactly 0 elsewhere, and a lake with its
    activation statistics over corpus "c"."""
    from tests.labeling.test_scoring import planted_lake

    model, lake = planted_lake(tmp_path_factory.mktemp("selfreport"))
    return model, str(lake.root)
