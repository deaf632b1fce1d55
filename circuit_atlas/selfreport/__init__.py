"""Self-report: a model trained to report its own neuron activations, and the honest
baselines it must beat. The scanner ranks the neurons worth reporting (``scanner``);
the other steps (dataset, predictor, trainer, evaluation) build on it."""

from circuit_atlas.stage import lazy_exports

__getattr__ = lazy_exports(__name__, {"scan": "scanner", "run_scan": "scanner"})
__all__ = ["run_scan", "scan"]
