"""fra31's AutoAttack API (what RobustBench and most papers' code call) over PyPI's ``pyautoattack``.

``from autoattack import AutoAttack`` in code written for github.com/fra31/auto-attack expects
``AutoAttack(model, norm, eps, version, seed, log_path, verbose, attacks_to_run, device)`` and
``run_standard_evaluation(x, y, bs=..., return_labels=...)`` returning ``x_adv``; pyautoattack takes
keyword-only ``attacks``/``batch_size`` and returns ``(x_adv, y_adv)``. :func:`install` registers a module
``autoattack`` giving this adapter (and pyautoattack's submodules under their fra31 names), so RobustBench's
``benchmark()`` runs unchanged. The attacks are pyautoattack's own; only the calling convention changes, and
one default: the seed is 0 instead of the clock, so a call is reproducible (zoo-eval's default too).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Sequence

from .errors import BadInputError

DEFAULT_SEED = 0
#: pyautoattack's submodules, registered as ``autoattack.<name>`` like fra31's package layout.
SUBMODULES = ("autoattack", "autopgd_base", "fab_base", "fab_projections", "fab_pt", "square", "checks",
              "other_utils", "state")


class AutoAttack:
    """fra31's constructor and evaluation calls; everything else (``apgd``, ``fab``, ``square``,
    ``apgd_targeted``, ``attacks_to_run``, ``logger``, ...) is pyautoattack's object, reached through it."""

    def __init__(self, model, norm: str = "Linf", eps: float = 0.3, seed: int | None = DEFAULT_SEED,
                 verbose: bool = True, attacks_to_run: Sequence[str] = (), version: str = "standard",
                 is_tf_model: bool = False, device: Any = "cuda", log_path: str | None = None):
        import pyautoattack

        if is_tf_model:
            raise BadInputError("pyautoattack runs PyTorch models only (is_tf_model=True)",
                                hint="wrap the TensorFlow model for PyTorch, or use fra31's auto-attack directly")
        attacks = list(attacks_to_run) if version == "custom" else None
        self._aa = pyautoattack.AutoAttack(model, attacks=attacks, device=device, eps=eps, norm=norm,
                                           seed=DEFAULT_SEED if seed is None else seed, version=version)
        self._aa.verbose = verbose
        self.log_path = log_path

    def __getattr__(self, name: str) -> Any:   # called only for names not set on the adapter itself
        return getattr(self.__dict__["_aa"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_aa", "log_path"):
            object.__setattr__(self, name, value)
        else:   # e.g. adversary.apgd.n_restarts = 1 or adversary.attacks_to_run = [...] in fra31-style scripts
            setattr(self._aa, name, value)

    def run_standard_evaluation(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False,
                                state_path: str | Path | None = None):
        state = None if state_path is None else Path(state_path)
        if state is not None and state.exists():
            raise BadInputError(f"AutoAttack state {state} exists, and pyautoattack 0.2.0 cannot resume from it "
                                "(every resume raises)",
                                hint="delete it to start over, or evaluate with zoo-eval, which resumes (--resume)")
        with self._logging():
            x_adv, y_adv = self._aa.run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=state)
        return (x_adv, y_adv) if return_labels else x_adv

    def run_standard_evaluation_individual(self, x_orig, y_orig, bs: int = 250, return_labels: bool = False):
        with self._logging():
            out = self._aa.run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
        if return_labels:
            return out
        return {attack: value[0] if isinstance(value, tuple) else value for attack, value in out.items()}

    def clean_accuracy(self, x_orig, y_orig, bs: int = 250) -> float:
        with self._logging():
            return self._aa.clean_accuracy(x_orig, y_orig, bs=bs)

    def _logging(self):
        """fra31 prints progress when verbose (and appends it to ``log_path``); pyautoattack logs it."""
        return _LogTo(self._aa.logger, self.log_path if self._aa.verbose else None, self._aa.verbose)


class _LogTo:
    """pyautoattack's logger sent to stdout and/or a file for the length of one call."""

    def __init__(self, logger: logging.Logger, log_path: str | None, verbose: bool):
        self.logger, self.handlers, self.level = logger, [], logger.level
        if verbose:
            self.handlers.append(logging.StreamHandler(sys.stdout))
        if log_path:
            self.handlers.append(logging.FileHandler(log_path, mode="a"))

    def __enter__(self):
        for handler in self.handlers:
            self.logger.addHandler(handler)
        if self.handlers:
            self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.logger.setLevel(self.level)
        return False


def install() -> types.ModuleType:
    """Make ``import autoattack`` give this adapter, unless a real fra31 ``autoattack`` is importable."""
    existing = sys.modules.get("autoattack")
    if existing is not None:
        return existing
    if importlib.util.find_spec("autoattack") is not None:   # fra31's own package is installed: use it
        return importlib.import_module("autoattack")
    package = types.ModuleType("autoattack", __doc__)
    package.__path__ = []   # a package, so ``import autoattack.state`` finds the entries registered below
    for name in SUBMODULES:
        module = importlib.import_module(f"pyautoattack.{name}")
        sys.modules[f"autoattack.{name}"] = module
        setattr(package, name, module)
    package.AutoAttack = AutoAttack   # the submodule named autoattack must not shadow the class
    sys.modules["autoattack"] = package
    return package
