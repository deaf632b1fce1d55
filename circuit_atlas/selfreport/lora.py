"""Low-rank adapters (LoRA, Hu et al. 2021) on every linear map of every block.

Each ``nn.Linear`` of a block's attention and MLP becomes ``W x + (alpha / r) B A x``
with ``A`` (r x in) drawn small and ``B`` (out x r) zero, so the adapted model starts
equal to the frozen one and only ``A`` and ``B`` train: ``2 r (in + out)`` numbers per
map instead of ``in x out``. ``alpha = 2 r`` (a common default) keeps the update's scale
independent of the rank. Written here rather than through ``peft``: the whole method is
the two matrices below, and the model keeps its own modules, so the rest of the trainer
(checkpoints, resume, the token head) sees a list of parameters as with ``last:N``.
"""

from __future__ import annotations

import math

import torch


class LoRALinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base, self.scale = base, 2.0
        dev = base.weight.device
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        # the initialisation peft and the paper use: A Kaiming-uniform, B zero
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = (x.to(self.a.dtype) @ self.a.T) @ self.b.T
        return self.base(x) + (self.scale * low).to(x.dtype)


def attach(layers: torch.nn.ModuleList, rank: int) -> list[torch.nn.Parameter]:
    """Replace every ``nn.Linear`` inside ``layers`` (attention and MLP projections) by a
    :class:`LoRALinear` of ``rank``; returns the adapters' parameters in a fixed order
    (block, then module name), the only ones that train."""
    params = []
    for layer in layers:
        names = [n for n, m in layer.named_modules() if type(m) is torch.nn.Linear]
        for name in names:
            parent, _, child = name.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            adapted = LoRALinear(getattr(owner, child), rank)
            setattr(owner, child, adapted)
            params += [adapted.a, adapted.b]
    return params

