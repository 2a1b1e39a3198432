"""Runnable stages, one per module: ``python -m stages.<name> --config F --set k=v``."""
