"""Self-report: a model trained to report its own neuron activations, and the honest
baselines it must beat: the scanner ranks the neurons worth reporting (``scanner``),
the dataset maps a corpus's windows to neurons' activations (``dataset``), the
trainer trains and evaluates (``trainer``, ``evaluate``), and one head shared by many
neurons is tested on neurons it never saw (``transfer``)."""

from circuit_atlas.stage import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "scan": "scanner", "run_scan": "scanner", "run_dataset": "dataset",
    "run_train": "trainer", "run_eval": "trainer", "ScanParams": "params",
    "DatasetParams": "params", "TrainParams": "params", "EvalParams": "params",
    "run_transfer": "transfer", "TransferParams": "params"})
__all__ = ["DatasetParams", "EvalParams", "ScanParams", "TrainParams", "TransferParams",
           "run_dataset", "run_eval", "run_scan", "run_train", "run_transfer", "scan"]
