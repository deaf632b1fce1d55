"""Weights & Biases is never required: without the package nothing is logged and
training runs; where it is installed and configured (here offline, no account), a run's
configuration, epochs and test scores reach it."""

import importlib.util

import pytest

from circuit_atlas.selfreport import tracking
from circuit_atlas.selfreport.params import TrainParams
from circuit_atlas.selfreport.trainer import run_train

HAS_WANDB = importlib.util.find_spec("wandb") is not None


def test_nothing_is_logged_without_wandb_or_its_configuration(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from wandb login
    assert not tracking.configured()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.configured() == HAS_WANDB
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not tracking.configured()
    tracker = tracking.Tracker("run", {"a": 1})
    tracker.log({"epoch": 0})  # a no-op
    tracker.finish({"x": 1.0})
    assert tracker.run is None


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (it is optional)")
def test_an_offline_wandb_run_holds_the_config_epochs_and_scores(planted, tmp_path,
                                                                monkeypatch):
    from circuit_atlas.selfreport.dataset import run_dataset
    from circuit_atlas.selfreport.params import DatasetParams

    model, root = planted
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dataset(root, model=model, corpora="c", params=DatasetParams(
        neuron="L1/N7", context=8, val=0.15, test=0.25))
    seen = {}
    finish = tracking.Tracker.finish

    def keep(self, summary=None):  # what the live wandb run holds as it closes
        if self.run is not None:
            seen["config"] = dict(self.run.config)
            seen["summary"] = {**dict(self.run.summary), **(summary or {})}
        finish(self, summary)

    monkeypatch.setattr(tracking.Tracker, "finish", keep)
    report = run_train(root, model=model, corpora="c", params=TrainParams(
        read_layer=1, epochs=3, lr=0.05, patience=5))
    assert seen["config"]["neuron"] == "L1/N7" and seen["config"]["read_layer"] == 1
    assert seen["summary"]["epoch"] == 2 and "val_loss" in seen["summary"]
    assert seen["summary"]["test_r2/self-report"] == report.results["self-report"]
    # and the run file wandb wrote (to sync later) holds them
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    assert b"L1/N7" in data and b"test_r2/self-report" in data and b"val_loss" in data
