"""Plots: files written (PNG + SVG) at paper-column size, fonts >= 8 pt, and the error paths."""

from __future__ import annotations

import struct
import sys

import pytest
from tests.support.reports import FIXTURES, make_record

from zoo.errors import BadInputError, ZooError
from zoo.evaluate.report import leaderboard as lb
from zoo.evaluate.report import plots
from zoo.evaluate.report.cli import main

pytest.importorskip("matplotlib", reason="plots need the matplotlib extra")

EXPECTED_PX = (round(plots.WIDTH_IN * plots.DPI), round(plots.HEIGHT_IN * plots.DPI))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def check_outputs(base):
    png, svg = base.with_suffix(".png"), base.with_suffix(".svg")
    assert png_size(png) == EXPECTED_PX == (1050, 780)
    text = svg.read_text()
    assert "<svg" in text and len(text) > 2000
    assert not list(base.parent.glob(".*.tmp"))  # atomic writes leave no temp files behind


def check_fonts(fig):
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
    assert texts
    assert min(t.get_fontsize() for t in texts) >= plots.MIN_FONT_PT


def test_stages_plot_from_cli(tmp_path, capsys):
    a = make_record(clean=8855, robust=6090, stages=(6400, 6120, 6095, 6090)).write(tmp_path / "r")
    b = make_record(model="score-wrn-70-16", clean=8900, robust=6330).write(tmp_path / "r")
    bad = tmp_path / "r" / "bad.json"
    bad.write_text("{}")
    unfinished = make_record(run_id="half", complete=False).write(tmp_path / "r")
    assert main(["plot", "stages", str(a), str(b), str(bad), str(unfinished), "-o", str(tmp_path / "fig.png")]) == 0
    err = capsys.readouterr().err
    assert "bad.json: schema_version None" in err and "unfinished run half" in err
    check_outputs(tmp_path / "fig")


def test_stages_figure_content_and_fonts():
    runs = [make_record(n=100, clean=88, robust=60, stages=(66, 62, 60, 60)),
            make_record(n=100, clean=88, robust=59, stages=(66, 62, 60, 59), run_id="again")]
    fig = plots.stages_figure(runs)
    check_fonts(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(ax.lines[0].get_ydata()) == [88.0, 66.0, 62.0, 60.0, 60.0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1].endswith("[again]") and len(set(labels)) == 2  # same model twice: told apart by run id


def test_stages_without_usable_records(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("nope")
    assert main(["plot", "stages", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "none of the given result records can be used" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))


def test_scatter_highlights_score(tmp_path):
    root = tmp_path / "r"
    make_record(clean=8855, robust=6090).write(root)
    board = lb.build_leaderboard("cifar10", "linf", eps=8 / 255, results_dir=root,
                                 model_info_dir=FIXTURES / "robustbench_model_info")
    fig = plots.scatter_figure(board)
    check_fonts(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["WRN-28-10"]  # ours and RobustBench's SCORE point: one label
    assert [c.get_label() for c in ax.collections] == ["other models", "SCORE (RobustBench)", "SCORE (this harness)"]
    assert [len(c.get_offsets()) for c in ax.collections] == [3, 1, 1]
    assert list(ax.collections[2].get_offsets()[0]) == [88.55, 60.9]
    assert main(["plot", "scatter", "--results", str(root), "--eps", "8/255", "--model-info",
                 str(FIXTURES / "robustbench_model_info"), "-o", str(tmp_path / "scatter")]) == 0
    check_outputs(tmp_path / "scatter")


def test_eps_plot(tmp_path, capsys):
    root = tmp_path / "r"
    for k, robust in ((2, 8000), (4, 7400), (8, 6090)):
        make_record(eps=f"{k}/255", clean=8855, robust=robust, run_id=f"e{k}").write(root)
    make_record(model="score-wrn-70-16", clean=8900, robust=6330, run_id="single").write(root)  # one eps only
    records = lb.load_records(root).records
    series = plots.eps_series(records, "cifar10", "linf")
    assert list(series) == ["score-wrn-28-10"]
    assert [r.run_id for r in series["score-wrn-28-10"]] == ["e2", "e4", "e8"]
    fig = plots.eps_figure(series, "linf")
    check_fonts(fig)
    assert list(fig.axes[0].lines[0].get_xdata()) == pytest.approx([2, 4, 8])
    assert main(["plot", "eps", "--results", str(root), "-o", str(tmp_path / "eps.svg")]) == 0
    check_outputs(tmp_path / "eps")


def test_eps_plot_needs_two_eps(tmp_path, capsys):
    make_record(clean=8855, robust=6090).write(tmp_path)
    assert main(["plot", "eps", "--results", str(tmp_path), "-o", str(tmp_path / "eps")]) == 2
    err = capsys.readouterr().err
    assert "needs finished cifar10/linf runs at two or more eps" in err and "score-wrn-28-10 (8/255)" in err
    with pytest.raises(BadInputError, match="found: none"):
        plots.eps_series([], "cifar100", "linf")


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ZooError, match="plotting needs matplotlib") as err:
        plots.stages_figure([make_record(n=10, clean=8, robust=5)])
    assert 'pip install "score-zoo[plots]"' in str(err.value)
