"""Exponential moving averages (EMA) of a model's parameters, at one or several rates.

After every optimizer step, for each rate ``r`` (guided-diffusion's ``update_ema``)::

    theta_ema <- r * theta_ema + (1 - r) * theta

computed as ``theta_ema.lerp_(theta, 1 - r)``. The averages start as a copy of the initial parameters.
With warm-up (``update(step)``), the rate of update n is ``min(r, (1 + n) / (10 + n))`` (the schedule of
tf.train.ExponentialMovingAverage's ``num_updates``), so short or time-boxed runs do not average in the
random initialisation for thousands of steps.
RCDM and ADM keep one EMA at r = 0.9999 and release only the EMA weights. Buffers (the UNet's feature
statistics, when it has them) are not averaged: the EMA state dicts and ``copy_to`` take them from the
model as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn


def rate_key(rate: float) -> str:
    """The key of an EMA in checkpoints: the rate as written in the config, e.g. "0.9999"."""
    return repr(float(rate))


class EMA:
    """EMAs of ``model``'s parameters at each of ``rates`` (each in (0, 1))."""

    def __init__(self, model: nn.Module, rates: Sequence[float]) -> None:
        rates = tuple(float(r) for r in rates)
        if not rates:
            raise ValueError("ema_rates is empty: give at least one rate, e.g. [0.9999]")
        if len(set(rates)) != len(rates) or any(not 0.0 < r < 1.0 for r in rates):
            raise ValueError(f"ema_rates must be distinct numbers in (0, 1), got {list(rates)}")
        self.model = model
        self.rates = rates
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow: dict[float, list[Tensor]] = {
            r: [p.detach().clone() for p in model.parameters()] for r in rates
        }

    @staticmethod
    def warmup_rate(rate: float, step: int | None) -> float:
        """The rate of update number ``step`` (0-based) with warm-up; ``rate`` itself when step is None."""
        return rate if step is None else min(rate, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One EMA step towards the model's current parameters (warm-up when ``step`` is given)."""
        params = [p.detach() for p in self.model.parameters()]
        for r, shadow in self.shadow.items():
            torch._foreach_lerp_(shadow, params, 1.0 - self.warmup_rate(r, step))

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """{rate_key: a full model state dict with the averaged parameters} (loads with strict=True)."""
        base = self.model.state_dict()
        out = {}
        for r, shadow in self.shadow.items():
            sd = dict(base)
            sd.update(zip(self.names, shadow))
            out[rate_key(r)] = sd
        return out

    def load_state_dict(self, states: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Restore the averages from ``state_dict()`` output; every configured rate must be there."""
        missing = [rate_key(r) for r in self.rates if rate_key(r) not in states]
        if missing:
            raise KeyError(
                f"the checkpoint has EMAs at rates {sorted(states)} but not {missing}: "
                "resume with the ema_rates it was trained with"
            )
        with torch.no_grad():
            for r, shadow in self.shadow.items():
                sd = states[rate_key(r)]
                for name, t in zip(self.names, shadow):
                    t.copy_(sd[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module, rate: float | None = None) -> nn.Module:
        """Load the EMA at ``rate`` (default: the first) into ``module`` (same architecture)."""
        rate = self.rates[0] if rate is None else float(rate)
        for p, t in zip(module.parameters(), self.shadow[rate]):
            p.copy_(t)
        for b, t in zip(module.buffers(), self.model.buffers()):
            b.copy_(t)
        return module
