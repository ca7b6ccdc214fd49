"""zoo publish: upstream file -> safetensors + config + model card -> (loopback) Hub -> zoo.load, bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import zoo
from zoo import pins
from zoo.cli import main
from zoo.evaluate.record import Accuracy, RunRecord, Stage
from zoo.publish import FILES

from tests.support.servers import (HUB_REPO, MODEL, URL_PATH, assert_same_weights, checkpoint_bytes, sha256,
                                   tiny_state)


@pytest.fixture(scope="module")
def state():
    return tiny_state(seed=3)


def _record(tmp_path: Path, checkpoint_sha: str, **overrides) -> Path:
    fields = dict(
        run_id="20240101-000000-abc", model=MODEL, dataset="cifar10", threat="linf", norm="Linf", eps="8/255",
        eps_value=8 / 255, version="standard", attacks=("apgd-ce", "apgd-t"), seed=0, indices=tuple(range(10)),
        clean=Accuracy(9, 10), robust=Accuracy(4, 10),
        stages=(Stage("apgd-ce", Accuracy(5, 10), 1.0), Stage("apgd-t", Accuracy(4, 10), 1.0)),
        engine="autoattack", precision="fp32", batch_size=10, libraries={"torch": "x"}, device="cpu",
        checkpoint={"source": "local file", "sha256": checkpoint_sha, "path": "x"},
        data={"source": "file", "path": "x", "sha256": "0" * 64}, config_hash="0" * 16,
        created="2024-01-01T00:00:00Z")
    fields.update(overrides)
    return RunRecord(**fields).write(tmp_path / "results")


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("\n---\n", 1)[0][4:])


def test_publish_uploads_and_zoo_load_gives_bit_identical_weights(zoo_env, state, capsys):
    upstream = checkpoint_bytes(state, "authors")
    zoo_env.web.add(URL_PATH, upstream)
    zoo_env.registry()  # hub source: {org}/tiny-wrn-cifar10-linf, nothing there yet

    assert main(["publish", MODEL, "--repo-id", HUB_REPO]) == 0

    out = capsys.readouterr().out
    commit = zoo_env.hub.head(HUB_REPO)
    files = zoo_env.hub.files(HUB_REPO)
    assert set(FILES) <= set(files)
    weights = files["model.safetensors"]
    assert f"commit {commit}" in out
    assert f"sha256 {sha256(weights)}  size {len(weights)} bytes" in out
    assert f"converted from URL {zoo_env.web.url}{URL_PATH} (sha256 {sha256(upstream)})" in out
    snippet = (f'{{kind: hub, repo_id: "{{org}}/tiny-wrn-cifar10-linf", filename: model.safetensors, '
               f"revision: {commit}, sha256: {sha256(weights)}, size: {len(weights)}}}")
    assert snippet in out

    # the published repo now comes first, and the printed values work as pins
    zoo_env.registry(revision=commit, sha256={"hub": sha256(weights)}, size={"hub": len(weights)})
    model = zoo.load(MODEL)
    assert model.checkpoint_info.source == f"Hugging Face Hub {HUB_REPO}/model.safetensors@{commit}"
    assert_same_weights(model, state)
    (cached,) = [p for p in zoo_env.files_in(zoo_env.zoo_cache) if p != pins.pins_path()]   # the authors' file
    assert_same_weights(zoo.load(MODEL, checkpoint=cached), state)

    config = json.loads(files["config.json"])
    assert config["architecture"] == {"name": "dm_wide_resnet", "label": "WideResNet-10-1", "depth": 10,
                                      "width": 1, "activation": "silu"}
    assert config["converted_from"]["sha256"] == sha256(upstream)
    model_index = _front_matter(files["README.md"].decode())["model-index"]
    assert model_index[0]["results"][0]["metrics"][1]["value"] == 42.5


def test_republishing_the_same_upstream_file_makes_no_new_commit(zoo_env, state, capsys):
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "authors"))
    zoo_env.registry()
    assert main(["publish", MODEL, "--repo-id", HUB_REPO]) == 0
    first = zoo_env.hub.head(HUB_REPO)
    capsys.readouterr()

    assert main(["publish", MODEL, "--repo-id", HUB_REPO]) == 0

    assert zoo_env.hub.head(HUB_REPO) == first  # reproducible bytes: nothing changed, nothing committed
    assert f"commit {first}" in capsys.readouterr().out
    assert len(zoo_env.hub.commit_payloads) == 1


def test_publishing_to_a_branch_creates_it_and_loads_by_revision(zoo_env, state):
    zoo_env.web.add(URL_PATH, checkpoint_bytes(state, "robustbench"))
    zoo_env.registry()

    assert main(["publish", MODEL, "--repo-id", HUB_REPO, "--revision", "v1", "--private"]) == 0

    assert zoo_env.hub.repos[HUB_REPO].private
    assert "model.safetensors" in zoo_env.hub.files(HUB_REPO, "v1")
    assert "model.safetensors" not in zoo_env.hub.files(HUB_REPO, "main")
    model = zoo.load(MODEL, revision="v1")
    assert model.checkpoint_info.source.startswith(f"Hugging Face Hub {HUB_REPO}/model.safetensors@")
    assert_same_weights(model, state)


def test_output_dir_writes_config_and_model_card_without_uploading(zoo_env, state, tmp_path):
    upstream = tmp_path / "upstream.pt"
    upstream.write_bytes(checkpoint_bytes(state, "bare"))
    record = _record(tmp_path, sha256(upstream.read_bytes()))
    zoo_env.registry()
    out = tmp_path / "out"

    assert main(["publish", MODEL, "--checkpoint", str(upstream), "--result", str(record),
                 "--output-dir", str(out)]) == 0

    assert zoo_env.all_requests() == []
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    config = json.loads((out / "config.json").read_text())
    assert config == {**config, "registry_name": MODEL, "robustbench_id": "Tiny2024Test_WRN10_1",
                      "num_classes": 10, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616],
                      "dataset": "cifar10", "threat": "linf", "eps": "8/255", "eps_value": 8 / 255}
    front = _front_matter((out / "README.md").read_text())
    assert front["license"] == "other" and front["license_link"] == "https://example.org/code"
    assert "adversarial-robustness" in front["tags"] and front["datasets"] == ["cifar10"]
    reported, measured = front["model-index"][0]["results"]
    assert reported["dataset"] == {"type": "cifar10", "name": "CIFAR-10", "split": "test"}
    assert [m["value"] for m in reported["metrics"]] == [81.25, 42.5]
    assert reported["metrics"][1]["args"] == {"attack": "AutoAttack (standard)", "norm": "Linf", "eps": "8/255",
                                              "n_examples": 10000}
    assert reported["source"]["url"] == "https://example.org/paper"
    assert [m["value"] for m in measured["metrics"]] == [90.0, 40.0]
    assert measured["metrics"][1]["args"]["n_examples"] == 10
    assert "zoo-eval run 20240101-000000-abc" in measured["source"]["name"]
    # same input, same bytes: the sha256 to pin does not depend on the run
    again = tmp_path / "again"
    assert main(["publish", MODEL, "--checkpoint", str(upstream), "--output-dir", str(again)]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_weights_that_do_not_fit_the_architecture_are_not_published(zoo_env, tmp_path, capsys):
    wrong = tmp_path / "wrn16.pt"
    wrong.write_bytes(checkpoint_bytes(tiny_state(0, depth=16), "robustbench"))
    zoo_env.registry()

    assert main(["publish", MODEL, "--checkpoint", str(wrong), "--repo-id", HUB_REPO]) == 2

    err = capsys.readouterr().err
    assert "does not fit WideResNet" in err and "unexpected key(s): layer.0.block.1." in err
    assert zoo_env.hub.requests == [] and zoo_env.hub.repos == {}


def test_result_record_of_other_weights_is_refused_before_anything_is_written(zoo_env, state, tmp_path, capsys):
    upstream = tmp_path / "upstream.pt"
    upstream.write_bytes(checkpoint_bytes(state, "bare"))
    record = _record(tmp_path, "f" * 64, model="other-model", dataset="cifar100")
    zoo_env.registry()
    out = tmp_path / "out"

    assert main(["publish", MODEL, "--checkpoint", str(upstream), "--result", str(record),
                 "--output-dir", str(out)]) == 2

    err = capsys.readouterr().err
    assert "the result record does not match what is published" in err
    assert "evaluated model 'other-model'" in err and "cifar100/linf, not cifar10/linf" in err
    assert f"sha256 {'f' * 64}, not the weights being published" in err
    assert not out.exists()


def test_publish_without_upstream_source_asks_for_a_checkpoint(zoo_env, capsys):
    zoo_env.registry(sources=[{"kind": "hub"}])

    assert main(["publish", MODEL, "--repo-id", HUB_REPO]) == 2
    assert "lists no upstream (non-Hub) source" in capsys.readouterr().err
    assert zoo_env.all_requests() == []
