"""RCDM: Representation-Conditional Diffusion Models (Bordes, Balestriero, Vincent, TMLR 2022).

The library: models, diffusion, samplers, encoders, shard format, feature bank, checkpoints, metrics.
It holds no command-line code and never imports Ray; runnable stages live in ``stages/``.
"""

__version__ = "0.1.0"
