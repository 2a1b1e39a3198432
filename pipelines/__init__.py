"""Compositions of stages: the embedded demo and batch sampling as a Ray job."""
