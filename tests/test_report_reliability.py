"""The reliability verdict in every report: model_info, leaderboards, the paper table, the submission text."""

from dataclasses import replace

from tests.support.reports import make_record

from zoo.evaluate import checks
from zoo.evaluate.record import RunRecord
from zoo.evaluate.report import leaderboard as lb
from zoo.evaluate.report import model_info as mi
from zoo.evaluate.report import paper_table as pt

UNRELIABLE = checks.section([
    checks.Check("zero_gradients", checks.WARNING, "40 attacked point(s) had an exactly zero gradient",
                 {"per_attack": {"apgd-dlr": 40}}),
    checks.Check("randomized", checks.OK, "5 repeated forwards agree"),
])
RELIABLE = checks.section([checks.Check("randomized", checks.OK, "5 repeated forwards agree")])


def _full(**kw):
    return make_record(**{"clean": 8855, "robust": 6090, "n": 10000, **kw})


def test_section_verdict_and_round_trip(tmp_path):
    assert UNRELIABLE["unreliable"] and UNRELIABLE["because"] == ["zero_gradients"]
    assert not RELIABLE["unreliable"]
    informational = checks.section([checks.Check("decision_ties", checks.WARNING, "1 tie")])
    assert not informational["unreliable"]   # reported only
    path = replace(_full(), checks=UNRELIABLE).write(tmp_path)
    again = RunRecord.read(path)
    assert again.unreliable and again.unreliable_because == ["zero_gradients"]
    assert again.to_dict()["schema_version"] == 2


def test_model_info_unreliable_field():
    assert mi.model_info(replace(_full(), checks=UNRELIABLE))["unreliable"] is True
    assert mi.model_info(replace(_full(), checks=RELIABLE))["unreliable"] is False
    assert mi.model_info(_full())["unreliable"] is False    # version-1 record: no verdict


def test_submission_text_names_the_fired_checks():
    text = mi.submission_text([replace(_full(), checks=UNRELIABLE)])
    assert "- **Reliability checks**: UNRELIABLE: zero_gradients: 40 attacked point(s)" in text
    assert "none fired" in mi.submission_text([replace(_full(), checks=RELIABLE)])


def test_leaderboard_marks_unreliable_rows_with_a_footnote(tmp_path):
    replace(_full(run_id="a"), checks=UNRELIABLE).write(tmp_path)
    replace(_full(model="score-wrn-70-16", robust=6300, run_id="b"), checks=RELIABLE).write(tmp_path)
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=tmp_path)
    assert {e.model_id: e.unreliable for e in board.entries} == {
        "score-wrn-28-10": True, "score-wrn-70-16": False}
    md = lb.to_markdown(board)
    assert "**score-wrn-28-10** ‡" in md and "**score-wrn-70-16** ‡" not in md
    assert "‡ unreliable evaluation" in md
    assert list(board.to_frame()["unreliable"]) == [False, True]
    assert "unreliable" not in lb.to_csv(board).splitlines()[0]    # the CSV keeps RobustBench's columns


def test_paper_table_marks_unreliable_rows(tmp_path):
    replace(_full(run_id="a"), checks=UNRELIABLE).write(tmp_path)
    table = pt.build_paper_table(tmp_path)
    row = next(r for r in table.rows if r.record is not None)
    assert row.status.endswith("‡")
    assert any(n.startswith("‡ unreliable evaluation") and "zero_gradients" in n for n in table.notes)
    assert "‡" in pt.to_markdown(table)
