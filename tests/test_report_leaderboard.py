"""Leaderboard ranking, refusal to mix, bad-file handling, and the md / LaTeX / CSV renderings (golden)."""

from __future__ import annotations

import csv
import io

import pytest
from tests.support.reports import FIXTURES, check_golden, make_record

from zoo.errors import BadInputError
from zoo.evaluate.report import leaderboard as lb
from zoo.evaluate.report.cli import main

PUBLISHED_ROOT = FIXTURES / "robustbench_model_info"


def build_results(root):
    """A results tree with every trap the leaderboard must avoid, and its expected cifar10/8-255 ranking."""
    # older and newer run of the same model: only the newer counts
    make_record(clean=8700, robust=5900, created="2025-01-01T00:00:00+00:00", run_id="old").write(root)
    make_record(clean=8855, robust=6090, created="2025-02-01T00:00:00+00:00", run_id="new").write(root)
    # a 1000-point run (mixed n_ex => footnote), a custom model, and a RobustBench-id alias of a registry name
    make_record(model="score-wrn-70-16", clean=890, robust=634, n=1000, run_id="wrn70-subset").write(root)
    make_record(model="my-net", clean=9000, robust=5000, run_id="custom").write(root)
    # never in the cifar10 / 8-255 / standard table:
    make_record(eps="4/255", clean=8855, robust=7500, run_id="eps4").write(root)
    make_record(dataset="cifar100", clean=6500, robust=3300, run_id="c100").write(root)
    make_record(version="plus", clean=8855, robust=6000, created="2025-03-01T00:00:00+00:00",
                run_id="plus").write(root)
    make_record(clean=8855, robust=6500, complete=False, created="2025-04-01T00:00:00+00:00",
                run_id="unfinished").write(root)
    broken = root / "cifar10" / "linf" / "score-wrn-28-10" / "broken.json"
    broken.write_text('{"schema_version": 1, "run_id": "broken", ')
    (root / "README.md").write_text("not a record")
    (root / "cifar10" / "linf" / "score-wrn-28-10" / "new.npz").write_bytes(b"\x00")
    return root


@pytest.fixture
def results(tmp_path):
    return build_results(tmp_path / "results")


def test_ranks_latest_finished_standard_runs(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results)
    assert [(e.model_id, e.robust, e.n_ex) for e in board.entries] == [
        ("score-wrn-70-16", 63.4, 1000), ("score-wrn-28-10", 60.9, 10000), ("my-net", 50.0, 10000)]
    assert board.entries[1].source == "score-zoo run new"
    assert [e.score for e in board.entries] == [True, True, False]
    warnings = "\n".join(board.warnings)
    assert "broken.json: cannot read result record" in warnings
    assert "unfinished.json: unfinished run unfinished (complete: false) -- excluded" in warnings
    assert "README" not in warnings and "npz" not in warnings
    assert any("different numbers of test points" in n and "n=1000: score-wrn-70-16" in n for n in board.notes)


def test_robustbench_ids_count_as_the_same_model(tmp_path):
    root = tmp_path / "r"
    make_record(model="Pang2022Robustness_WRN28_10", clean=8000, robust=5000, created="2025-05-01T00:00:00+00:00",
                run_id="alias").write(root)
    make_record(clean=8855, robust=6090, created="2025-02-01T00:00:00+00:00", run_id="named").write(root)
    board = lb.build_leaderboard("cifar10", "linf", results_dir=root)
    assert [(e.model_id, e.source) for e in board.entries] == [("score-wrn-28-10", "score-zoo run alias")]


def test_with_published_entries(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    ids = [e.model_id for e in board.entries]
    assert ids == ["Wang2023Better_WRN-70-16", "Rebuffi2021Fixing_70_16_cutmix_extra", "score-wrn-70-16",
                   "Pang2022Robustness_WRN28_10", "score-wrn-28-10", "my-net",
                   "Standard"]
    rebuffi = board.entries[1]
    assert rebuffi.robust == 66.56 and not rebuffi.ours  # `external` wins over autoattack_acc (66.58)
    assert board.entries[3].score and board.entries[3].paper.startswith("Robustness")  # stripped leading space
    warnings = "\n".join(board.warnings)
    assert "Fixture2099OtherEps.json: eps 4/255, not 8/255 -- excluded" in warnings
    assert "Fixture2099Malformed.json: malformed model_info file" in warnings
    assert any(n.startswith("† evaluated with score-zoo") for n in board.notes)


def test_golden_renderings(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    check_golden("leaderboard.md", lb.to_markdown(board))
    check_golden("leaderboard.tex", lb.to_latex(board))
    check_golden("leaderboard.csv", lb.to_csv(board))


def test_golden_runs_only(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results)
    check_golden("leaderboard_runs.md", lb.to_markdown(board))


def test_csv_is_machine_readable(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    rows = list(csv.DictReader(io.StringIO(lb.to_csv(board))))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    assert {r["eps"] for r in rows} == {"8/255"} and {r["dataset"] for r in rows} == {"cifar10"}
    assert rows[2]["n_ex"] == "1000" and rows[2]["source"] == "score-zoo run wrn70-subset"


def test_other_eps_is_its_own_table(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=4 / 255, results_dir=results)
    assert [(e.model_id, e.source) for e in board.entries] == [("score-wrn-28-10", "score-zoo run eps4")]
    assert board.eps == "4/255"
    c100 = lb.build_leaderboard("cifar100", "linf", results_dir=results)
    assert [e.source for e in c100.entries] == ["score-zoo run c100"]


def test_several_eps_without_choice_is_refused(results):
    with pytest.raises(BadInputError, match=r"several eps \(4/255, 8/255\)") as err:
        lb.build_leaderboard("cifar10", "linf", results_dir=results)
    assert "--eps" in str(err.value)


def test_nothing_at_the_requested_eps(results):
    with pytest.raises(BadInputError, match="no finished AutoAttack-standard results for cifar10/linf at eps 2/255"
                       ) as err:
        lb.build_leaderboard("cifar10", "linf", eps=2 / 255, results_dir=results)
    assert "4/255, 8/255" in str(err.value)


def test_other_version_is_named_in_the_hint(tmp_path):
    make_record(version="plus", run_id="p").write(tmp_path)
    with pytest.raises(BadInputError, match="version\\(s\\) plus"):
        lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path)
    board = lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path, version="plus")
    assert board.entries[0].source == "score-zoo run p"


def test_empty_results(tmp_path):
    with pytest.raises(BadInputError, match="no AutoAttack-standard results for cifar10/linf") as err:
        lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path)
    assert "run zoo-eval first" in str(err.value)


def test_other_versions_do_not_count_as_other_eps(tmp_path):
    make_record(run_id="std").write(tmp_path)
    make_record(eps="4/255", version="rand", run_id="rand4").write(tmp_path)  # not an eps choice for 'standard'
    assert [e.source for e in lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path).entries] == [
        "score-zoo run std"]
    with pytest.raises(BadInputError, match=r"no AutoAttack-custom results .*\n.*version\(s\) rand, standard"):
        lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path, version="custom")


def test_wrongly_typed_published_entry_is_excluded(tmp_path):
    (tmp_path / "Odd.json").write_text('{"name": 5, "dataset": "cifar10", "eps": "8/255", "clean_acc": "1", '
                                       '"autoattack_acc": "0.5"}')
    make_record().write(tmp_path / "r")
    board = lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path / "r", model_info_dir=tmp_path)
    assert [e.ours for e in board.entries] == [True]
    assert board.warnings == [f"{tmp_path / 'Odd.json'}: field(s) ['name'] must be strings -- excluded"]


def test_uniform_subset_is_labelled(tmp_path):
    make_record(n=500, clean=440, robust=300).write(tmp_path)
    board = lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path)
    assert board.notes == ["All rows use a subset of 500 of the 10000 test points (partial runs)."]


def test_markdown_escapes_pipes_and_latex_escapes_specials():
    import pandas as pd

    from zoo.evaluate.report import tables

    frame = pd.DataFrame({"a|b": ["x|y"], "c": ["50% of A_b & #1 {x} † — Δ"]})
    assert "x\\|y" in tables.markdown(frame, "lr") and "a\\|b" in tables.markdown(frame, "lr")
    tex = tables.latex(frame, "lr")
    assert r"50\% of A\_b \& \#1 \{x\} $^\dagger$ --- $\Delta$" in tex and "a|b & c" in tex
    assert tables.latex_escape("50% of A_b & #1 {x} ~ ^ \\") == (
        r"50\% of A\_b \& \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{}")
    with pytest.raises(ValueError, match="alignment"):
        tables.markdown(frame, "l")


def test_frame_is_typed_for_notebooks(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    frame = board.to_frame()
    assert list(frame.columns) == list(lb.FRAME_COLUMNS)
    assert frame["rank"].tolist() == list(range(1, 8))
    assert frame["robust_acc"].tolist() == [e.robust for e in board.entries]
    assert str(frame["n_ex"].dtype) == "Int64" and frame["n_ex"].tolist()[:3] == [10000, 10000, 1000]
    assert frame["ours"].dtype == bool and frame.loc[frame.ours, "model_id"].tolist() == [
        "score-wrn-70-16", "score-wrn-28-10", "my-net"]
    assert frame.sort_values("clean_acc", ascending=False)["model_id"].iloc[0] == "Standard"
    assert frame.loc[frame.model_id == "my-net", "paper"].isna().all()


# ---------------------------------------------------------------- CLI

def test_cli_writes_file_and_warns_by_name(results, tmp_path, capsys):
    out = tmp_path / "board.md"
    code = main(["leaderboard", "--results", str(results), "--eps", "8/255", "--model-info",
                 str(PUBLISHED_ROOT / "cifar10" / "Linf"), "-o", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "broken.json" in err and "unfinished.json" in err
    assert out.read_text() == (FIXTURES / "leaderboard.md").read_text()


def test_cli_formats_to_stdout(results, capsys):
    for fmt, golden in (("latex", "leaderboard.tex"), ("csv", "leaderboard.csv")):
        assert main(["leaderboard", "--results", str(results), "--eps", "0.031372549019607843",
                     "--model-info", str(PUBLISHED_ROOT), "--format", fmt]) == 0
        assert capsys.readouterr().out == (FIXTURES / golden).read_text()


def test_cli_model_info_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./results here
    assert main(["leaderboard", "--model-info", str(PUBLISHED_ROOT)]) == 2  # two eps among the files
    assert "several eps (4/255, 8/255)" in capsys.readouterr().err
    assert main(["leaderboard", "--model-info", str(PUBLISHED_ROOT), "--eps", "8/255"]) == 0
    captured = capsys.readouterr()
    assert "ranking the model_info entries only" in captured.err
    assert "| **1** | **Wang2023Better_WRN-70-16** " in captured.out


@pytest.mark.parametrize("argv, message", [
    (["leaderboard", "--results", "{tmp}/missing"], "results folder {tmp}/missing does not exist"),
    (["leaderboard", "--results", "{tmp}", "--eps", "eight"], "cannot parse eps 'eight'"),
    (["leaderboard", "--results", "{tmp}", "--eps=-8/255"], "eps must be positive"),
    (["leaderboard", "--results", "{tmp}", "--model-info", "{tmp}/nope"],
     "model_info folder {tmp}/nope does not exist"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out.md"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["-o", str(out)]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not out.exists()


def test_cli_usage_errors_return_2(capsys):
    assert main(["leaderboard", "--format", "pdf"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--help"]) == 0



@pytest.mark.parametrize("field, value", [
    ("created", 5), ("created", "yesterday"), ("eps_value", "8/255"), ("model", None), ("dataset", 3),
    ("complete", "false"), ("stages", [1, 2]), ("clean", [1]), ("indices", None), ("schema_version", 3),
])
def test_wrongly_typed_record_is_named_and_excluded(tmp_path, field, value):
    import json

    good = make_record(run_id="good").write(tmp_path)
    data = json.loads(good.read_text())
    data[field] = value
    bad = good.with_name("bad.json")
    bad.write_text(json.dumps(data))
    loaded = lb.load_records(tmp_path)
    assert [r.run_id for r in loaded.records] == ["good"]
    assert len(loaded.warnings) == 1 and loaded.warnings[0].startswith(f"{bad}: ")
    assert loaded.warnings[0].endswith("-- excluded")


def test_latest_run_compares_times_across_spellings(tmp_path):
    make_record(clean=8000, robust=5000, created="2025-06-01T10:00:00", run_id="naive-later").write(tmp_path)
    make_record(clean=8855, robust=6090, created="2025-06-01T09:00:00Z", run_id="utc-earlier").write(tmp_path)
    make_record(clean=8855, robust=6090, created="2025-06-01T11:30:00+02:00", run_id="cest-earliest").write(tmp_path)
    board = lb.build_leaderboard("cifar10", "linf", results_dir=tmp_path)
    assert [e.source for e in board.entries] == ["score-zoo run naive-later"]


def test_custom_data_from_different_files_is_never_ranked_together():
    import dataclasses

    from zoo.errors import BadInputError
    from zoo.evaluate.report.leaderboard import latest_runs

    a = dataclasses.replace(make_record(model="net-a", dataset="custom", n=100, clean=80, robust=50),
                            data={"source": "file", "path": "a.npz", "content_sha256": "a" * 64})
    b = dataclasses.replace(make_record(model="net-b", dataset="custom", n=100, clean=70, robust=40),
                            data={"source": "file", "path": "b.npz", "content_sha256": "b" * 64})
    assert set(latest_runs([a, dataclasses.replace(b, data=a.data)], "custom", "linf", 8 / 255)) == {"net-a", "net-b"}
    with pytest.raises(BadInputError, match="2 different data files"):
        latest_runs([a, b], "custom", "linf", 8 / 255)


def test_a_full_run_beats_a_newer_subset_run():
    from zoo.evaluate.report.leaderboard import latest_runs

    full = make_record(n=10000, clean=8861, robust=6104, run_id="full", created="2025-01-01T00:00:00+00:00")
    quick = make_record(n=100, clean=90, robust=60, run_id="quick", created="2025-06-01T00:00:00+00:00")
    newer_full = make_record(n=10000, clean=8860, robust=6100, run_id="again", created="2025-07-01T00:00:00+00:00")
    assert latest_runs([full, quick], "cifar10", "linf", 8 / 255)["score-wrn-28-10"].run_id == "full"
    assert latest_runs([full, quick, newer_full], "cifar10", "linf", 8 / 255)["score-wrn-28-10"].run_id == "again"


# ---------------------------------------------------------------- RobustBench's own conventions

DECIMAL_EPS = FIXTURES / "robustbench_decimal_eps" / "cifar10" / "Linf" / "Zhang2019Theoretically.json"


def published_folder(tmp_path, *extra):
    """RobustBench's Linf fixtures plus the TRADES entry, whose file writes 8/255 as "0.031" (as RobustBench's does),
    plus ``extra`` (name, dict) entries."""
    import json
    import shutil

    folder = tmp_path / "model_info" / "cifar10" / "Linf"
    shutil.copytree(PUBLISHED_ROOT / "cifar10" / "Linf", folder)
    shutil.copy(DECIMAL_EPS, folder)
    for name, data in extra:
        (folder / f"{name}.json").write_text(json.dumps(data))
    return tmp_path / "model_info"


def test_decimal_eps_within_1e3_of_k_over_255_is_that_budget(tmp_path):
    near = {"name": "n", "dataset": "cifar10", "eps": "0.0314", "clean_acc": "80.00", "autoattack_acc": "40.00"}
    far = {"name": "f", "dataset": "cifar10", "eps": "0.03", "clean_acc": "80.00", "autoattack_acc": "45.00"}
    root = published_folder(tmp_path, ("Near", near), ("Far", far))
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, model_info_dir=root)
    ids = [e.model_id for e in board.entries]
    assert ids.index("Zhang2019Theoretically") == ids.index("Pang2022Robustness_WRN28_10") + 1  # 53.08 < 61.04
    assert "Near" in ids and "Far" not in ids  # 0.03 is 1.4e-3 away from 8/255: another budget
    trades = board.entries[ids.index("Zhang2019Theoretically")]
    assert (trades.clean, trades.robust, trades.additional_data) == (84.92, 53.08, False)
    assert any("Zhang2019Theoretically (0.031)" in n and "counted as 8/255" in n for n in board.notes)
    assert any("Far.json: eps 0.03, not 8/255 -- excluded" in w for w in board.warnings)
    # the 4/255 board does not pick it up
    assert "Zhang2019Theoretically" not in [e.model_id for e in lb.build_leaderboard(
        "cifar10", "linf", eps=4 / 255, model_info_dir=root).entries]


def test_ties_break_in_the_documented_order(tmp_path):
    def entry(name, robust, clean):
        return (name, {"name": name, "dataset": "cifar10", "eps": "8/255", "clean_acc": clean,
                       "autoattack_acc": robust})

    root = published_folder(tmp_path, entry("Bbb", "61.04", "90.00"), entry("Aaa", "61.04", "88.61"),
                            entry("Ccc", "61.04", "88.61"))
    make_record(model="Aaa", clean=8861, robust=6104, run_id="ours-aaa").write(tmp_path / "r")
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, model_info_dir=root, results_dir=tmp_path / "r")
    tied = [(e.model_id, e.ours) for e in board.entries if e.robust == 61.04]
    # higher clean first; then model id; then our run before the published entry of the same id
    assert tied == [("Bbb", False), ("Aaa", True), ("Aaa", False), ("Ccc", False),
                    ("Pang2022Robustness_WRN28_10", False)]
    for _ in range(3):  # the same order whatever order the files are listed in
        assert lb.build_leaderboard("cifar10", "linf", eps=8 / 255, model_info_dir=root,
                                    results_dir=tmp_path / "r").entries == board.entries


def test_extra_data_column_from_model_info_and_registry(results):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    frame = board.to_frame()
    assert str(frame["additional_data"].dtype) == "boolean"
    extra = dict(zip(frame["model_id"], frame["additional_data"].astype(object)))
    assert extra["Rebuffi2021Fixing_70_16_cutmix_extra"] is True and extra["score-wrn-28-10"] is False
    assert frame.loc[frame.model_id == "my-net", "additional_data"].isna().all()  # unregistered: unknown ('-')


def test_interval_column_in_every_format(results, capsys):
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=results, model_info_dir=PUBLISHED_ROOT)
    ours = next(e for e in board.entries if e.model_id == "score-wrn-28-10")
    lo, hi = ours.robust_interval
    assert lo < 60.90 < hi and hi - lo < 2.5  # n=10000
    cell = f"[{lo:.2f}, {hi:.2f}]"
    md = lb.to_markdown(board, intervals=True)
    assert "Robust 95% CI" in md and cell in md and "Robust 95% CI" not in lb.to_markdown(board)
    wang = next(line for line in md.splitlines() if "Wang2023Better" in line)
    assert "[" not in wang.split("|")[6]  # published rows have no counts: blank cell
    assert "Robust 95\\% CI" in lb.to_latex(board, intervals=True) and cell in lb.to_latex(board, intervals=True)
    rows = list(csv.DictReader(io.StringIO(lb.to_csv(board, intervals=True))))
    by_id = {r["model_id"]: r for r in rows}
    assert (by_id["score-wrn-28-10"]["robust_ci_low"], by_id["score-wrn-28-10"]["robust_ci_high"]) == \
        (f"{lo:.2f}", f"{hi:.2f}")
    assert by_id["Standard"]["robust_ci_low"] == "" and "robust_ci_low" not in lb.to_csv(board)
    page = lb.to_html(board, intervals=True)
    assert ">Robust 95% CI</th>" in page and cell in page and "{{" not in page
    assert "Robust 95% CI" not in lb.to_html(board)
    assert main(["leaderboard", "--results", str(results), "--eps", "8/255", "--intervals"]) == 0
    assert cell in capsys.readouterr().out
