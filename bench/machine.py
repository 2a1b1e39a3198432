"""The machine description every benchmark prints beside its figures."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    parts = [f"{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)
