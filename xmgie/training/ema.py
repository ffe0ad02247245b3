"""An exponential moving average of the trained parameters, the weights a run hands out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class ParameterAverage:
    """The exponential moving average of ``parameters``, updated after each optimizer step.

    The average starts at the parameters after the first step; step ``t`` (1-based) then moves it towards the
    parameters by ``1 − min(decay, (1 + t)/(10 + t))`` — diffusers' ``EMAModel`` schedule: early steps, whose
    parameters are far from where the run ends, are forgotten fast, and the average settles to a window of about
    ``1/(1 − decay)`` steps. Training itself continues from the raw parameters.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.parameters = list(parameters)
        self.decay = decay
        self.averages: list[torch.Tensor] | None = None

    def rate(self, step: int) -> float:
        """How far step ``step`` moves the average towards the parameters."""
        return 1.0 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the parameters after optimizer step ``step``."""
        if self.averages is None:
            self.averages = [parameter.detach().clone() for parameter in self.parameters]
            return
        rate = self.rate(step)
        for average, parameter in zip(self.averages, self.parameters, strict=True):
            average.lerp_(parameter.detach(), rate)

    def state_dict(self) -> dict:
        return {"averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        averages = state["averages"]
        if averages is not None and len(averages) != len(self.parameters):
            raise ValueError(
                f"the saved average holds {len(averages)} tensors, the model trains {len(self.parameters)}"
            )
        self.averages = (
            None
            if averages is None
            else [saved.to(p.device, p.dtype) for saved, p in zip(averages, self.parameters, strict=True)]
        )

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averages in place of the parameters inside the block (to save them), the raw ones after it."""
        if self.averages is None:
            yield
            return
        raw = [parameter.detach().clone() for parameter in self.parameters]
        for parameter, average in zip(self.parameters, self.averages, strict=True):
            parameter.copy_(average)
        try:
            yield
        finally:
            for parameter, saved in zip(self.parameters, raw, strict=True):
                parameter.copy_(saved)
