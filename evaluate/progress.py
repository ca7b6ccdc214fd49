"""Progress through an attack stage that moves inside a batch, with an ETA from the work left.

Counted in model passes (images forwarded plus images backpropagated), which every restart, target class,
iteration and query consists of, so a stage of one huge batch still shows progress. The total is the stage's
upper bound (each point through every restart and iteration, from the engine's ``cost_per_point``); a resumed
run starts from the batches already done and measures its rate on its own work only. A bar on a terminal or
in a notebook (``tqdm.auto``), else a log line every ``log_every`` seconds and after every chunk.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time

from .estimate import fmt_seconds

log = logging.getLogger("zoo.evaluate")


def interactive() -> bool:
    """A terminal, or a Jupyter kernel (where tqdm.auto draws a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


class StageProgress:
    def __init__(self, enabled: bool, attack: str, stage: int, n_stages: int, points: int, points_done: int,
                 per_point: int, log_every: float = 60.0, measure: str = "robust"):
        self.enabled, self.attack, self.log_every, self.measure = enabled, attack, log_every, measure
        self.per_point = max(1, per_point)
        self.points, self.points_done = points, points_done
        self.total = points * self.per_point
        self.done = self.chunk_floor = points_done * self.per_point
        self.chunk_ceiling = self.total
        self.start_done, self.start_time = self.done, time.monotonic()
        self.last_note = self.start_time
        self.robust_text = ""
        self.bar = None
        if enabled and interactive():
            from tqdm.auto import tqdm
            width = shutil.get_terminal_size(fallback=(100, 24)).columns or 100
            self.bar = tqdm(total=self.total, initial=self.done, desc=f"[{stage + 1}/{n_stages}] {attack}",
                            unit="pass", unit_scale=True, file=sys.stderr, ncols=width, mininterval=0.5)

    def start_chunk(self, points: int) -> None:
        """The next chunk holds ``points`` points: passes inside it count up to its share of the bound."""
        self.chunk_floor = self.points_done * self.per_point
        self.chunk_ceiling = (self.points_done + points) * self.per_point

    def passes(self, images: int) -> None:
        """Called by the attacks' model view for every forward and backward pass (``images`` in it)."""
        if not self.enabled:
            return
        before = self.done
        self.done = min(self.chunk_ceiling, self.done + images)
        if self.bar is not None:
            self.bar.update(self.done - before)
        elif time.monotonic() - self.last_note >= self.log_every:
            self._note()

    def end_chunk(self, points: int, robust: int, n: int) -> None:
        self.points_done += points
        self.robust_text = f"{self.measure} {100.0 * robust / n:.2f}% so far" if n else ""
        before, self.done = self.done, self.points_done * self.per_point
        if self.bar is not None:
            self.bar.update(self.done - before)
            self.bar.set_postfix_str(self.robust_text)
        elif self.enabled:
            self._note()

    def eta_seconds(self) -> float:
        elapsed = time.monotonic() - self.start_time
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        return (self.total - self.done) / rate if rate > 0 else float("nan")

    def _note(self) -> None:
        self.last_note = time.monotonic()
        share = 100.0 * self.done / self.total if self.total else 100.0
        log.info("%s: %d/%d points, %.0f%% of the stage's model passes (upper bound), %s, ETA at most %s",
                 self.attack, self.points_done, self.points, share, self.robust_text or "running",
                 fmt_seconds(self.eta_seconds()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
