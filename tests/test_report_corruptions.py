"""Reports for corruptions runs and cross-threat runs: RobustBench's corruptions model_info format (written and
read, every shape its code and curated files use), the corruptions leaderboard, the heat map, and cross-threat
rows kept out of the ranking."""

import json

import pytest

from tests.support.reports import make_corruptions_record, make_record
from zoo.errors import BadInputError
from zoo.evaluate.record import RunRecord
from zoo.evaluate.report import cli, leaderboard, model_info

# The shapes RobustBench ships in model_info/<dataset>/corruptions/: a curated file (eps null, mCE), one without
# mCE or footnote, what its update_json writes (every ModelInfo field, autoattack_acc null), an ImageNet-style
# file with the 3D common corruption fields beside the 2D ones, and a 3DCC-only file.
CURATED = {"link": "https://arxiv.org/abs/1912.02781", "name": "AugMix", "authors": "Dan Hendrycks et al.",
           "additional_data": False, "number_forward_passes": 1, "dataset": "cifar10", "venue": "ICLR 2020",
           "architecture": "WideResNet-40-2", "eps": None, "clean_acc": "95.08", "reported": "89.10",
           "corruptions_acc": "89.03", "corruptions_mce": "11.59", "footnote": ""}
NO_MCE = {k: v for k, v in CURATED.items() if k not in ("corruptions_mce", "footnote")} | {
    "name": "Standardly trained model", "clean_acc": "94.78", "corruptions_acc": "73.46", "reported": None}
UPDATE_JSON = {"link": None, "name": None, "authors": None, "additional_data": None, "number_forward_passes": None,
               "dataset": "cifar10", "venue": None, "architecture": None, "eps": None, "clean_acc": "90.1",
               "reported": None, "corruptions_acc": "80.5", "corruptions_acc_3d": None, "corruptions_mce": "20.3",
               "corruptions_mce_3d": None, "autoattack_acc": None, "footnote": None}
WITH_3D = CURATED | {"name": "With 3D", "clean_acc": "80.00", "corruptions_acc": "60.00",
                     "corruptions_acc_3d": "55.00", "corruptions_mce_3d": "50.00"}
ONLY_3D = UPDATE_JSON | {"corruptions_acc": None, "corruptions_mce": None, "corruptions_acc_3d": "40.0"}


@pytest.fixture
def folders(tmp_path):
    info = tmp_path / "model_info" / "cifar10" / "corruptions"
    info.mkdir(parents=True)
    for name, doc in {"Hendrycks2020AugMix_WRN": CURATED, "Standard": NO_MCE, "Written2024": UPDATE_JSON,
                      "With3D": WITH_3D, "Only3D": ONLY_3D}.items():
        (info / f"{name}.json").write_text(json.dumps(doc, indent=2))
    results = tmp_path / "results"
    make_corruptions_record().write(results)
    return tmp_path / "model_info", results


def test_corruptions_leaderboard_ranks_by_corruptions_acc(folders):
    info, results = folders
    board = leaderboard.build_leaderboard("cifar10", "corruptions", results_dir=results, model_info_dir=info)
    ids = [e.model_id for e in board.entries]
    assert ids[:2] == ["Hendrycks2020AugMix_WRN", "Written2024"]
    robust = [e.robust for e in board.entries]
    assert robust == sorted(robust, reverse=True)
    assert "score-wrn-28-10" in ids and "With3D" in ids and "Only3D" not in ids
    assert any("Only3D.json: 3D common corruptions only" in w for w in board.warnings)
    assert "eps" not in board.title and "corruptions" in board.title
    ours = next(e for e in board.entries if e.ours)
    assert ours.robust == make_corruptions_record().robust.percent and ours.trained_threat is None


def test_model_info_writes_robustbench_corruptions_format_and_reads_it_back(tmp_path):
    record = make_corruptions_record()
    entry = model_info.model_info(record)
    text = model_info.dumps_model_info(entry)
    doc = json.loads(text)
    assert tuple(doc) == model_info.CORRUPTIONS_MODEL_INFO_KEYS
    assert doc["eps"] is None and doc["corruptions_acc"] == f"{record.robust.percent:.2f}"
    assert "autoattack_acc" not in doc
    path = tmp_path / "x.json"
    path.write_text(text)
    assert model_info.read_model_info(path).robust == record.robust.percent
    with pytest.raises(BadInputError, match="per corruption"):
        model_info.model_info(make_corruptions_record(n=100))
    assert model_info.model_info(make_corruptions_record(n=100), allow_partial=True)["clean_acc"]


def test_zoo_report_cli_corruptions_board_model_info_and_heat_map(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    info, results = folders
    assert cli.main(["leaderboard", "--dataset", "cifar10", "--threat", "corruptions", "--results", str(results),
                     "--model-info", str(info)]) == 0
    out = capsys.readouterr().out
    assert "AugMix" in out and "score-wrn-28-10" in out
    [record] = results.rglob("*.json")
    assert cli.main(["model-info", str(record), "-o", str(tmp_path / "mi")]) == 0
    [written] = (tmp_path / "mi").rglob("*.json")
    assert written.parent.name == "corruptions" and json.loads(written.read_text())["eps"] is None
    assert cli.main(["plot", "corruptions", str(record), "-o", str(tmp_path / "heat")]) == 0
    assert (tmp_path / "heat.png").stat().st_size > 1000 and (tmp_path / "heat.svg").is_file()
    linf = make_record()
    linf.write(results)
    [linf_path] = [p for p in results.rglob("*.json") if "linf" in str(p)]
    assert cli.main(["plot", "corruptions", str(linf_path), "-o", str(tmp_path / "no")]) == 2


def test_cross_threat_rows_are_marked_and_never_ranked(tmp_path):
    results = tmp_path / "results"
    own = make_record(model="score-wrn-70-16", threat="l2", eps="0.5", robust=7000, clean=9000)
    own.write(results)
    cross = RunRecord(**{**own.__dict__, "model": "score-wrn-28-10", "run_id": "cross", "trained_threat": "linf",
                         "robust": own.robust.__class__(9500, 10000), "clean": own.clean.__class__(9600, 10000),
                         "stages": tuple(s.__class__(s.attack, own.robust.__class__(9500, 10000), 1.0)
                                         for s in own.stages)})
    cross.write(results)
    board = leaderboard.build_leaderboard("cifar10", "l2", results_dir=results)
    assert [e.model_id for e in board.entries] == ["score-wrn-70-16", "score-wrn-28-10"]   # higher, yet last
    frame = board.to_frame()
    assert frame["rank"].iloc[0] == 1 and frame["rank"].isna().iloc[1]
    assert frame["model_id"].iloc[1].endswith("§") and "‡" not in frame["model_id"].iloc[1]
    assert any("trained for Linf" in n for n in board.notes)
    md = leaderboard.to_markdown(board)
    last_row = [line for line in md.splitlines() if "score-wrn-28-10" in line][0]
    assert last_row.split("|")[1].strip() == "-" and "§" in last_row and "‡" not in last_row
    assert any(n.startswith("§ trained for another threat") for n in board.notes)
    assert leaderboard.to_html(board) and leaderboard.to_csv(board)
    tex = leaderboard.to_latex(board)
    assert "score-wrn-28-10 \\S{}" in tex and "§" not in tex   # typeset by plain LaTeX, mark and footnote
    with pytest.raises(BadInputError, match="trained for linf"):
        model_info.model_info(cross)


def test_schema_1_records_still_read(tmp_path):
    doc = make_record().to_dict()
    doc["schema_version"] = 1
    for key in ("kind", "trained_threat", "corruptions", "checks", "integrity"):   # what schema 2 added
        doc.pop(key, None)
    record = RunRecord.from_dict(doc)
    assert (record.kind, record.trained_threat, record.corruptions) == ("autoattack", None, None)
    doc["kind"] = "autoattack"
    with pytest.raises(BadInputError, match="unknown field"):
        RunRecord.from_dict(doc)
    bad = make_corruptions_record().to_dict()
    bad["corruptions"]["fog"] = bad["corruptions"]["fog"][:4]
    with pytest.raises(BadInputError, match="5 severities"):
        RunRecord.from_dict(bad)
