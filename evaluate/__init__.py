"""AutoAttack evaluation harness (installed as ``zoo.evaluate``): ``run``, ``plan``, ``merge``, ``verify_record``.

Attributes load lazily, so ``zoo.evaluate.record`` (read by the reports and ``zoo publish``) can be imported
without the runner, the attacks or torch.
"""

from zoo._lazy import lazy_attributes

_EXPORTS = {"run": ".runner", "plan": ".runner", "merge": ".runner", "RunOptions": ".options",
            "RunRecord": ".record", "PerExample": ".record", "verify_record": ".reverify"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
