"""The paper's table: reported vs reproduced, missing and partial rows labelled, the suite the runner uses."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from tests.support.reports import FIXTURES, check_golden, make_record

from zoo.evaluate.report import paper_table as pt
from zoo.evaluate.report.cli import main


def build_results(root):
    # cifar10 WRN-28-10: a full run; a newer unfinished run and a newer 'plus' run must not replace it
    make_record(clean=8855, robust=6090, created="2025-02-01T00:00:00+00:00", run_id="full-2810", seed=3).write(root)
    make_record(clean=9000, robust=7000, created="2025-03-01T00:00:00+00:00", run_id="unfinished",
                complete=False).write(root)
    make_record(clean=8855, robust=6000, created="2025-03-02T00:00:00+00:00", run_id="plus",
                version="plus").write(root)
    make_record(eps="4/255", clean=8855, robust=7400, run_id="eps4").write(root)  # not the paper's eps
    # cifar100 WRN-70-16: only a 1000-point run
    make_record(model="score-wrn-70-16", dataset="cifar100", clean=660, robust=335, n=1000,
                created="2025-02-03T00:00:00+00:00", run_id="subset-7016").write(root)
    (root / "cifar100" / "linf" / "score-wrn-70-16" / "garbage.json").write_text("[1, 2")
    return root


def test_paper_suite_lists_the_four_releases():
    suite = pt.paper_suite()
    assert [(e.model, e.dataset, e.threat, e.eps) for e in suite] == [
        ("score-wrn-28-10", "cifar10", "linf", "8/255"), ("score-wrn-70-16", "cifar10", "linf", "8/255"),
        ("score-wrn-28-10", "cifar100", "linf", "8/255"), ("score-wrn-70-16", "cifar100", "linf", "8/255")]
    model, dataset, threat, eps = suite[0]  # plain tuples for callers that unpack
    assert (model, eps) == ("score-wrn-28-10", "8/255")


def test_rows_match_reported_and_reproduced(tmp_path):
    table = pt.build_paper_table(build_results(tmp_path))
    by_key = {(r.evaluation.model, r.evaluation.dataset): r for r in table.rows}
    full = by_key[("score-wrn-28-10", "cifar10")]
    assert full.record.run_id == "full-2810" and full.status == "full test set"
    assert (full.reported_clean, full.reported_robust) == (88.61, 61.04)
    assert by_key[("score-wrn-70-16", "cifar10")].record is None
    assert by_key[("score-wrn-70-16", "cifar10")].status == "not yet reproduced"
    assert by_key[("score-wrn-70-16", "cifar100")].status == "partial (n=1000 of 10000)"
    assert any("garbage.json" in w for w in table.warnings)
    assert any("unfinished.json" in w for w in table.warnings)
    frame = table.to_frame()
    assert list(frame.columns) == list(pt.FRAME_COLUMNS)
    first = frame.iloc[0]
    assert (first.model, first.dataset, first.run_id, first.n_ex) == ("score-wrn-28-10", "cifar10", "full-2810", 10000)
    assert [round(first[c], 2) for c in ("clean_reported", "clean_ours", "clean_delta", "robust_reported",
                                         "robust_ours", "robust_delta")] == [88.61, 88.55, -0.06, 61.04, 60.9, -0.14]
    assert frame.loc[frame.run_id.isna(), "status"].tolist() == ["not yet reproduced"] * 2
    assert frame["robust_ours"].isna().sum() == 2 and str(frame["n_ex"].dtype) == "Int64"


def test_golden_paper_tables(tmp_path):
    table = pt.build_paper_table(build_results(tmp_path))
    check_golden("paper.md", pt.to_markdown(table))
    check_golden("paper.tex", pt.to_latex(table))


def test_nothing_reproduced_yet(tmp_path):
    text = pt.to_markdown(pt.build_paper_table(tmp_path))
    assert text.count("not yet reproduced") == 4
    squeezed = re.sub(r" +\|", " |", re.sub(r"\| +", "| ", text))  # without tabulate's column padding
    assert "| CIFAR-100 | score-wrn-70-16 | 8/255 | 65.56 | — | — | 33.05 | — | — | — |" in squeezed


def test_cli_paper(tmp_path, capsys):
    root = build_results(tmp_path / "results")
    out = tmp_path / "paper.tex"
    assert main(["paper", "--results", str(root), "--format", "latex", "-o", str(out)]) == 0
    assert out.read_text() == (FIXTURES / "paper.tex").read_text()
    assert "garbage.json" in capsys.readouterr().err


def test_cli_paper_default_results_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["paper"]) == 2
    assert "results folder results does not exist" in capsys.readouterr().err
    build_results(tmp_path / "results")
    assert main(["paper"]) == 0
    assert capsys.readouterr().out == (FIXTURES / "paper.md").read_text()


@pytest.mark.parametrize("fmt", ["html", "csv"])
def test_cli_paper_rejects_other_formats(fmt, capsys):
    assert main(["paper", "--format", fmt]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_only_released_checkpoints_count_as_reproductions(tmp_path):
    # cifar10 WRN-28-10: a released run, and a newer run on a local unverified file (shown, not counted)
    make_record(clean=8855, robust=6090, created="2025-02-01T00:00:00+00:00", run_id="released").write(tmp_path)
    make_record(clean=9500, robust=7000, created="2025-03-01T00:00:00+00:00", run_id="mine",
                provenance="local-unverified").write(tmp_path)
    # cifar10 WRN-70-16: only a record older than provenance, which does not count either
    make_record(model="score-wrn-70-16", clean=8900, robust=6330, run_id="old", provenance=None).write(tmp_path)
    # cifar100 WRN-28-10: a --checkpoint copy of the release (local-release) counts
    make_record(dataset="cifar100", clean=6300, robust=3100, run_id="copy", provenance="local-release").write(tmp_path)
    table = pt.build_paper_table(tmp_path)
    rows = [(r.evaluation.model, r.evaluation.dataset, r.record.run_id if r.record else None, r.status)
            for r in table.rows]
    assert rows == [
        ("score-wrn-28-10", "cifar10", "released", "full test set"),
        ("score-wrn-28-10", "cifar10", "mine", "unverified weights (local-unverified), not counted"),
        ("score-wrn-70-16", "cifar10", None, "not yet reproduced"),
        ("score-wrn-70-16", "cifar10", "old", "unverified weights (provenance not recorded), not counted"),
        ("score-wrn-28-10", "cifar100", "copy", "full test set"),
        ("score-wrn-70-16", "cifar100", None, "not yet reproduced")]
    frame = table.to_frame()
    mine = frame[frame.run_id == "mine"].iloc[0]
    assert mine.robust_ours == 70.0 and pd.isna(mine.robust_delta) and mine.provenance == "local-unverified"
    assert round(frame[frame.run_id == "released"].iloc[0].robust_delta, 2) == -0.14
    text = pt.to_markdown(table)
    assert "run released, seed 0, n=10000, 2025-02-01T00:00:00+00:00; released checkpoint (sha256 " + "ab" * 32 in text
    assert "run mine, seed 0, n=10000, 2025-03-01T00:00:00+00:00; local file, not verified against a release" in text
    assert "run copy" in text and "Rows marked 'unverified weights'" in text
    assert "unverified weights (local-unverified), not counted" in text
