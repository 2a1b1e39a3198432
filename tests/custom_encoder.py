"""Custom encoders for tests/test_encoders.py (loaded as ``tests.custom_encoder:<factory>``)."""

from __future__ import annotations

import torch
from torch import nn

from rcdm.encoders import Encoder


class MeanColour(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> (N, 3): the mean of each channel, times a learnable scale."""

    feature_dim = 3
    input_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * self.scale  # (N, 3)


def factory() -> nn.Module:
    return MeanColour()


def encoder_factory() -> Encoder:
    return Encoder("mean_colour_v1", MeanColour(), head=False, feature_dim=3, input_size=32, weights_id="v1")


def bad_factory() -> nn.Module:
    return nn.Identity()
