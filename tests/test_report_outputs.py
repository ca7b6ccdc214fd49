"""`zoo-report ... -o PATH` where PATH cannot be written: exit 2 with the problem and the fix, nothing written."""

from __future__ import annotations

import pytest
from tests.support.reports import make_record

from zoo.evaluate.report.cli import main


@pytest.fixture
def record(tmp_path):
    return make_record(clean=8855, robust=6090).write(tmp_path / "results")


def commands(record, results):
    return {
        "leaderboard": ["leaderboard", "--results", str(results)],
        "leaderboard-html": ["leaderboard", "--results", str(results), "--format", "html"],
        "paper": ["paper", "--results", str(results)],
        "submission": ["submission", str(record)],
        "plot": ["plot", "stages", str(record)],
    }


NAMES = ["leaderboard", "leaderboard-html", "paper", "submission", "plot"]


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", NAMES)
def test_parent_is_a_file(name, record, tmp_path, capsys):
    if name == "plot":
        pytest.importorskip("matplotlib")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    before = snapshot(tmp_path)
    argv = commands(record, tmp_path / "results")[name] + ["-o", str(blocker / "sub" / "out.md")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err and "fix: choose another -o path" in err
    assert "Traceback" not in err and snapshot(tmp_path) == before and blocker.read_text() == "a file"


@pytest.mark.parametrize("name", NAMES)
def test_output_is_an_existing_folder(name, record, tmp_path, capsys):
    if name == "plot":
        pytest.importorskip("matplotlib")
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder if name != "plot" else folder.with_suffix(".png")
    if name == "plot":
        (tmp_path / "out.svg").mkdir()  # the plot writes out.png and out.svg: one of them is a folder
        target = tmp_path / "out"
    before = snapshot(tmp_path)
    assert main(commands(record, tmp_path / "results")[name] + ["-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is an existing folder" in err and "fix: give a file name" in err
    assert snapshot(tmp_path) == before


def test_model_info_root_is_a_file_or_under_one(record, tmp_path, capsys):
    blocker = tmp_path / "model_info"
    blocker.write_text("x")
    assert main(["model-info", str(record), "-o", str(blocker)]) == 2
    assert "is a file, but this command writes a folder" in capsys.readouterr().err
    assert main(["model-info", str(record), "-o", str(blocker / "deeper")]) == 2
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    # a folder where the model_info file itself should go
    (tmp_path / "tree" / "cifar10" / "Linf" / "Pang2022Robustness_WRN28_10.json").mkdir(parents=True)
    assert main(["model-info", str(record), "-o", str(tmp_path / "tree")]) == 2
    assert "Pang2022Robustness_WRN28_10.json is an existing folder" in capsys.readouterr().err
    assert blocker.read_text() == "x"
