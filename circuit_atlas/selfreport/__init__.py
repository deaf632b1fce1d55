"""Self-report: a model trained to report its own neuron activations, and the honest
baselines it must beat: the scanner ranks the neurons worth reporting (``scanner``),
the dataset maps a corpus's windows to one neuron's activations (``dataset``), the
trainer trains and evaluates (``trainer``, ``evaluate``)."""

from circuit_atlas.stage import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "scan": "scanner", "run_scan": "scanner", "run_dataset": "dataset",
    "run_train": "trainer", "run_eval": "trainer", "ScanParams": "params",
    "DatasetParams": "params", "TrainParams": "params", "EvalParams": "params"})
__all__ = ["DatasetParams", "EvalParams", "ScanParams", "TrainParams", "run_dataset",
           "run_eval", "run_scan", "run_train", "scan"]
