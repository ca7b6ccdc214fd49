"""Progress inside a stage (model passes, not only finished batches) with an ETA from the work left."""

import logging

from tests.support import helpers as h
from zoo.evaluate import progress, run
from zoo.evaluate.progress import StageProgress


def test_passes_move_the_stage_inside_a_chunk_and_a_resumed_stage_starts_where_it_was():
    bar = StageProgress(True, "apgd-ce", 0, 2, points=10, points_done=4, per_point=100, log_every=1e9)
    assert (bar.total, bar.done) == (1000, 400)   # a resumed stage: 4 points already attacked
    bar.start_chunk(3)
    bar.passes(50)
    bar.passes(100)
    assert bar.done == 550
    bar.passes(10_000)   # never past the chunk's share of the bound
    assert bar.done == 700
    bar.end_chunk(3, robust=5, n=10)
    assert bar.done == 700 and bar.points_done == 7 and "robust 50.00%" in bar.robust_text


def test_a_run_logs_progress_inside_its_stages(tmp_path, synthetic_data_file, monkeypatch, caplog):
    seen = []
    original = StageProgress.passes

    def passes(self, images):
        seen.append((self.attack, images))
        original(self, images)

    monkeypatch.setattr(StageProgress, "passes", passes)
    monkeypatch.setattr(progress, "interactive", lambda: False)
    with caplog.at_level(logging.INFO, logger="zoo.evaluate"):
        run(h.train_tiny_cnn(), data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"],
            batch_size=8, device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run",
            model_label="tiny", progress=True)
    assert len(seen) > 50 and {a for a, _ in seen} == {"apgd-ce"}   # every iteration's passes, not one per batch
    assert "of the stage's model passes (upper bound)" in caplog.text and "ETA at most" in caplog.text
