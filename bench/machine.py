"""What the bench scripts print about the machine they ran on: RESULTS.md records it beside every figure."""

from __future__ import annotations

import os

from zoo.evaluate.cpus import cpu_model

__all__ = ["cpu_model", "load_average"]


def load_average() -> str:
    """The 1 / 5 / 15 minute load averages (a shared 2-core machine makes timings noisy)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"
