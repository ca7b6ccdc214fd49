"""Commands that need no model must not import torch (seconds of start-up, and a GPU-less laptop need not care).

Each command runs in a fresh interpreter, so nothing an earlier test imported can hide or fake an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.helpers import run_without_torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "report"
RECORDS = FIXTURES / "records"
FINISHED = RECORDS / "cifar10" / "linf" / "score-wrn-28-10" / "20250301T120000Z-a1b2c3.json"  # 20 points
PUBLISHED = FIXTURES / "robustbench_model_info"

@pytest.mark.parametrize("argv", [["ls"], ["ls", "*70*", "--dataset", "cifar100"], ["info", "score-wrn-28-10"],
                                  ["info", "score-wrn-28-10", "--json"]], ids=" ".join)
def test_zoo_registry_commands(argv, tmp_path):
    run_without_torch("zoo.cli", argv, tmp_path)


REPORT_COMMANDS = {
    "leaderboard-md": ["leaderboard", "--results", str(RECORDS), "--model-info", str(PUBLISHED), "--eps", "8/255"],
    "leaderboard-latex": ["leaderboard", "--results", str(RECORDS), "--format", "latex", "-o", "lb.tex"],
    "leaderboard-csv": ["leaderboard", "--results", str(RECORDS), "--format", "csv", "-o", "lb.csv"],
    "leaderboard-html": ["leaderboard", "--results", str(RECORDS), "--format", "html", "-o", "lb.html"],
    "paper": ["paper", "--results", str(RECORDS)],
    "paper-latex": ["paper", "--results", str(RECORDS), "--format", "latex"],
    "model-info": ["model-info", str(FINISHED), "--allow-partial", "-o", "model_info"],
    "submission": ["submission", str(FINISHED), "--allow-partial"],
}


@pytest.mark.parametrize("argv", REPORT_COMMANDS.values(), ids=REPORT_COMMANDS.keys())
def test_report_commands(argv, tmp_path):
    run_without_torch("zoo.evaluate.report.cli", argv, tmp_path)


PLOT_COMMANDS = {
    "stages": ["plot", "stages", str(FINISHED), "-o", "stages"],
    "scatter": ["plot", "scatter", "--results", str(RECORDS), "--model-info", str(PUBLISHED), "--eps", "8/255",
                "-o", "scatter"],
}


@pytest.mark.parametrize("argv", PLOT_COMMANDS.values(), ids=PLOT_COMMANDS.keys())
def test_plots_import_matplotlib_but_not_torch(argv, tmp_path):
    pytest.importorskip("matplotlib")
    run_without_torch("zoo.evaluate.report.cli", argv, tmp_path)


def test_publish_takes_only_the_record_module_from_zoo_evaluate_and_only_when_needed():
    tree = ast.parse((ROOT / "zoo" / "publish.py").read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            name = "." * node.level + (node.module or "")
        elif isinstance(node, ast.Import):
            name = ",".join(alias.name for alias in node.names)
        else:
            continue
        if "evaluate" in name:
            found.append((name, id(node) in top_level))
    assert found, "zoo.publish reads result records through zoo.evaluate.record"
    assert all(name in (".evaluate.record", "zoo.evaluate.record") for name, _ in found), found
    assert not any(top for _, top in found), "import zoo.evaluate.record inside the function that needs it"
