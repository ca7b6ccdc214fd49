"""The ``zoo`` command: output, and exit code 2 with a useful message for every user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zoo.cli import main

from tests.support.servers import HUB_REPO, MODEL, URL_PATH, checkpoint_bytes, sha256, tiny_state


def test_ls_prints_one_row_per_variant_with_reported_numbers(zoo_env, capsys):
    zoo_env.registry()

    assert main(["ls"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["NAME", "ROBUSTBENCH", "ID", "DATASET", "THREAT", "EPS", "CLEAN", "%",
                              "AUTOATTACK", "%"]
    assert row.split() == [MODEL, "Tiny2024Test_WRN10_1", "cifar10", "linf", "8/255", "81.25", "42.50"]

    assert main(["ls", "Tiny2024*", "--threat", "linf"]) == 0  # RobustBench ids match too
    assert MODEL in capsys.readouterr().out
    assert main(["ls", "--dataset", "cifar100"]) == 1
    assert "no registered model matches '*' for dataset=cifar100" in capsys.readouterr().err


def test_info_human_readable_and_json(zoo_env, capsys):
    zoo_env.registry(sha256={"url": "a" * 64}, size={"url": 123})

    assert main(["info", "Tiny2024Test_WRN10_1"]) == 0  # RobustBench id as alias
    text = capsys.readouterr().out
    assert "tiny-wrn  (RobustBench id: Tiny2024Test_WRN10_1)" in text
    assert "WideResNet-10-1 (dm_wide_resnet, depth 10, width 1, silu)" in text
    assert f"2. URL {zoo_env.web.url}{URL_PATH}  [sha256 {'a' * 64}, 123 bytes]" in text
    assert "1. Hugging Face Hub testorg/tiny-wrn-cifar10-linf/model.safetensors@main  [sha256 not pinned]" in text

    assert main(["info", MODEL, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == MODEL and data["architecture"]["depth"] == 10
    hub = data["variants"][0]["sources"][0]
    assert hub["repo_id"] == "{org}/tiny-wrn-cifar10-linf" and hub["resolved_repo_id"] == HUB_REPO


@pytest.mark.parametrize("argv", [["info", "tiny-wnr"], ["download", "tiny-wnr"],
                                  ["publish", "tiny-wnr", "--output-dir", "x"]])
def test_unknown_model_exits_2_with_close_matches(zoo_env, capsys, argv):
    zoo_env.registry()

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert f"zoo {argv[0]}: error: unknown model 'tiny-wnr'" in err
    assert "did you mean tiny-wrn" in err and "`zoo ls`" in err
    assert zoo_env.all_requests() == []


@pytest.mark.parametrize("argv", [["download", MODEL, "--dataset", "cifar100"],
                                  ["publish", MODEL, "--dataset", "cifar100", "--output-dir", "x"]])
def test_dataset_the_model_lacks_exits_2_listing_what_exists(zoo_env, capsys, argv):
    zoo_env.registry()

    assert main(argv) == 2

    err = capsys.readouterr().err
    assert "tiny-wrn has no checkpoint for dataset" in err and "cifar100" in err
    assert "available: dataset='cifar10' threat='linf'" in err
    assert zoo_env.all_requests() == []


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: COMMAND"),
    (["download"], "the following arguments are required: NAME"),
    (["ls", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["info"], "the following arguments are required: name"),
])
def test_usage_errors_exit_2(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_download_prints_path_and_sha256(zoo_env, capsys):
    data = checkpoint_bytes(tiny_state(0), "safetensors")
    commit = zoo_env.hub.add_file(HUB_REPO, "model.safetensors", data)
    zoo_env.registry()

    assert main(["download", MODEL, "--dataset", "cifar10"]) == 0

    first, second = capsys.readouterr().out.strip().splitlines()
    name, path = first.split(": ", 1)
    assert name == f"{MODEL} cifar10/linf" and open(path, "rb").read() == data
    assert second.split() == ["sha256", sha256(data), str(len(data)), "bytes", "from", "Hugging", "Face", "Hub",
                              f"{HUB_REPO}/model.safetensors@{commit}", "(first-use)"]


def test_download_failure_exits_2_with_sources_and_fixes(zoo_env, capsys):
    zoo_env.registry()

    assert main(["download", MODEL]) == 2

    err = capsys.readouterr().err
    assert err.startswith("zoo download: error: could not download tiny-wrn")
    assert "repository testorg/tiny-wrn-cifar10-linf does not exist" in err and "HTTP 404" in err
    assert "--checkpoint PATH" in err


def test_publish_errors_exit_2(zoo_env, state_file, capsys):
    zoo_env.registry()

    assert main(["publish", MODEL, "--checkpoint", str(state_file)]) == 2
    assert "publishing needs --repo-id ORG/NAME (or --output-dir DIR" in capsys.readouterr().err

    assert main(["publish", MODEL, "--checkpoint", str(state_file), "--repo-id", "no-slash"]) == 2
    assert "is not of the form ORG/NAME" in capsys.readouterr().err

    zoo_env.set_offline()
    assert main(["publish", MODEL, "--checkpoint", str(state_file), "--repo-id", HUB_REPO]) == 2
    assert "cannot publish while offline mode is on" in capsys.readouterr().err
    zoo_env.set_offline(False)

    zoo_env.hub.stop()
    assert main(["publish", MODEL, "--checkpoint", str(state_file), "--repo-id", HUB_REPO]) == 2
    assert f"cannot reach the Hub to upload {HUB_REPO}" in capsys.readouterr().err


@pytest.fixture
def state_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(checkpoint_bytes(tiny_state(0), "bare"))
    return path


def test_module_entry_point_exits_2_on_user_error(zoo_env):
    zoo_env.registry()
    done = subprocess.run([sys.executable, "-m", "zoo.cli", "info", "tiny-wnr"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    assert done.returncode == 2
    assert "unknown model 'tiny-wnr'" in done.stderr and "Traceback" not in done.stderr
