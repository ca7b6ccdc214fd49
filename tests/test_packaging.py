"""The wheel installs `zoo` with `zoo.evaluate` inside it, ships the registry, and exposes the CLIs."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # both tests use the wheel the module fixture builds (pip wheel, tens of s)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "score-zoo"
    shutil.copytree(REPO, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "results"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True)
    (path,) = out.glob("score_zoo-*.whl")
    return path


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        registry = zf.read("zoo/checkpoints.yaml")
        meta = zf.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"zoo/__init__.py", "zoo/evaluate/__init__.py", "zoo/evaluate/record.py"} <= names
    assert not any(n.startswith("evaluate/") for n in names), "evaluate/ must only exist as zoo.evaluate"
    assert registry == (REPO / "checkpoints.yaml").read_bytes()  # a real copy, not a link
    for script in ("zoo = zoo.cli:main", "zoo-eval = zoo.evaluate.cli:main",
                   "zoo-report = zoo.evaluate.report.cli:main"):
        assert script in entry_points
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any("==" in line.split(";")[0] for line in requires), \
        "package metadata must use lower bounds only"


def test_wheel_installs_into_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # Reuse this interpreter's third-party packages (torch is GBs) *behind* the fresh venv's own site-packages.
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    Path(fresh_site, "zz_outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = ("import zoo, zoo.evaluate, zoo.evaluate.record, pathlib;"
             "print(pathlib.Path(zoo.__file__).parent.parent"
             " == pathlib.Path(zoo.evaluate.__file__).parent.parent.parent);"
             "print(zoo.registry.registry_path().is_file(), zoo.list_models())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.split("\n")[:2] == ["True", "True ['score-wrn-28-10', 'score-wrn-70-16']"]
    assert fresh_site in subprocess.run([str(py), "-c", "import zoo; print(zoo.__file__)"], capture_output=True,
                                        text=True, cwd=tmp_path, env=env).stdout
    for script in ("zoo", "zoo-eval", "zoo-report"):
        assert (bindir / script).exists()
    listing = subprocess.run([str(bindir / "zoo"), "ls"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "score-wrn-70-16" in listing.stdout
