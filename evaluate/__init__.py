"""AutoAttack evaluation harness (installed as ``zoo.evaluate``): ``run``, ``plan``, ``merge``."""

from .record import PerExample, RunRecord
from .runner import merge, plan, run

__all__ = ["run", "plan", "merge", "RunRecord", "PerExample"]
