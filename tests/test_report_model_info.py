"""RobustBench model_info files and the new-model submission text."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tests.support.reports import FIXTURES, check_golden, make_record

from zoo.errors import BadInputError, UnknownModelError
from zoo.evaluate.report import model_info as mi
from zoo.evaluate.report.cli import main

GOLDEN_MODEL_INFO = FIXTURES / "model_info" / "cifar10" / "Linf" / "Pang2022Robustness_WRN28_10.json"
PUBLISHED = FIXTURES / "robustbench_model_info" / "cifar10" / "Linf"


def full_run(**kw):
    return make_record(**{"clean": 8855, "robust": 6090, "n": 10000, **kw})


def test_model_info_matches_robustbench_format_byte_for_byte():
    # Hand-written after RobustBench's curated model_info/cifar10/Linf/*.json (its strings for SCORE).
    assert mi.dumps_model_info(mi.model_info(full_run())).encode() == GOLDEN_MODEL_INFO.read_bytes()


def test_reported_numbers_reproduce_robustbench_file_byte_for_byte():
    # RobustBench's own file for this model (tests/fixtures/report/robustbench_model_info), spelled as it spells
    # it: the name's leading space, the arXiv PDF link; a run with the reported numbers must give the same bytes.
    run = full_run(clean=8861, robust=6104)
    assert mi.dumps_model_info(mi.model_info(run)).encode() == \
        (PUBLISHED / "Pang2022Robustness_WRN28_10.json").read_bytes()


@pytest.mark.parametrize("model", ["score-wrn-28-10", "score-wrn-70-16"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_all_four_score_entries_use_robustbench_name_and_link(model, dataset):
    entry = mi.model_info(full_run(model=model, dataset=dataset))
    assert entry["name"] == " Robustness and Accuracy Could Be Reconcilable by (Proper) Definition"
    assert entry["link"] == "https://arxiv.org/pdf/2202.10103.pdf"


def test_custom_data_is_refused_naming_data_root(tmp_path, capsys):
    custom = replace(full_run(), dataset="custom", data={"source": "file", "path": "/x/mine.npz", "sha256": "cd" * 32})
    path = custom.write(tmp_path / "r")
    for argv in (["model-info", str(path)], ["submission", str(path)],
                 ["model-info", str(path), "-o", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "custom data (/x/mine.npz)" in err and "--data-root" in err
    assert not (tmp_path / "out").exists()


def test_model_info_has_robustbench_key_order_and_types():
    entry = json.loads(mi.dumps_model_info(mi.model_info(full_run(model="score-wrn-70-16", dataset="cifar100"))))
    published = json.loads((PUBLISHED / "Pang2022Robustness_WRN28_10.json").read_text())
    assert list(entry) == list(published)  # same keys, same order as RobustBench's own file for SCORE
    assert entry["architecture"] == "WideResNet-70-16" and entry["dataset"] == "cifar100"
    assert entry["reported"] == "33.05" and entry["eps"] == "8/255"
    assert entry["clean_acc"] == "88.55" and entry["autoattack_acc"] == "60.90"
    assert entry["additional_data"] is False and entry["unreliable"] is False


def test_cli_writes_model_info_into_a_robustbench_tree(tmp_path, capsys):
    a = full_run().write(tmp_path / "results")
    b = full_run(model="score-wrn-70-16", dataset="cifar100", clean=6500, robust=3300).write(tmp_path / "results")
    assert main(["model-info", str(a), str(b), "-o", str(tmp_path / "model_info")]) == 0
    out = tmp_path / "model_info" / "cifar10" / "Linf" / "Pang2022Robustness_WRN28_10.json"
    assert out.read_bytes() == GOLDEN_MODEL_INFO.read_bytes()
    other = json.loads((tmp_path / "model_info" / "cifar100" / "Linf" / "Pang2022Robustness_WRN70_16.json").read_text())
    assert (other["clean_acc"], other["autoattack_acc"]) == ("65.00", "33.00")


def test_cli_model_info_to_stdout(tmp_path, capsys):
    path = full_run().write(tmp_path)
    assert main(["model-info", str(path)]) == 0
    assert capsys.readouterr().out.encode() == GOLDEN_MODEL_INFO.read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"complete": False}, "is incomplete"),
    ({"version": "plus"}, "AutoAttack version 'plus'"),
    ({"eps": "4/255"}, "at eps 4/255, but the released checkpoint is rated at 8/255"),
    ({"n": 1000, "clean": 880, "robust": 600}, "covers only 1000 of 10000 test points"),
])
def test_model_info_refuses_runs_robustbench_would_not_list(change, message):
    with pytest.raises(BadInputError, match=message):
        mi.model_info(full_run(**change))


def test_partial_model_info_needs_explicit_permission(tmp_path, capsys):
    path = full_run(n=1000, clean=880, robust=600).write(tmp_path / "r")
    assert main(["model-info", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "covers only 1000 of 10000" in err and "--allow-partial" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert main(["model-info", str(path), "--allow-partial", "-o", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "cifar10" / "Linf" / "Pang2022Robustness_WRN28_10.json").read_text())
    assert written["autoattack_acc"] == "60.00"


def test_model_info_of_an_unregistered_model_names_it():
    with pytest.raises(UnknownModelError, match="my-own-net"):
        mi.model_info(full_run(model="my-own-net"))


def test_cli_model_info_rejects_a_malformed_record_by_name(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"schema_version": 1, "run_id": ')
    assert main(["model-info", str(bad), "-o", str(tmp_path / "out")]) == 2
    assert "broken.json: cannot read result record" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, threat, text", [
    (8 / 255, "linf", "8/255"), (4 / 255, "linf", "4/255"), (16 / 255, "linf", "16/255"),
    (1 / 255, "linf", "1/255"), (51 / 255, "linf", "51/255"), (0.03, "linf", "0.03"),
    (0.5, "l2", "0.5"), (12.0, "l1", "12"),
])
def test_format_eps_uses_robustbench_spelling(value, threat, text):
    assert mi.format_eps(value, threat) == text


def test_published_entry_ranks_by_external_when_present():
    entry = mi.read_model_info(PUBLISHED / "Rebuffi2021Fixing_70_16_cutmix_extra.json")
    assert (entry.model_id, entry.clean, entry.robust) == ("Rebuffi2021Fixing_70_16_cutmix_extra", 92.23, 66.56)
    assert mi.read_model_info(PUBLISHED / "Standard.json").robust == 0.0


def test_malformed_published_entry_is_named():
    with pytest.raises(BadInputError, match=r"Fixture2099Malformed.json: malformed model_info file"):
        mi.read_model_info(PUBLISHED / "Fixture2099Malformed.json")


def test_missing_model_info_folder_is_named(tmp_path):
    with pytest.raises(BadInputError, match="model_info folder .*nowhere does not exist"):
        mi.model_info_files(tmp_path / "nowhere", "cifar10", "linf")


def test_submission_text_golden(tmp_path):
    records = [full_run(seed=7), full_run(model="score-wrn-70-16", clean=8900, robust=6330, seed=7)]
    check_golden("submission.md", mi.submission_text(records))


def test_submission_cli_and_refusals(tmp_path, capsys):
    path = full_run().write(tmp_path)
    assert main(["submission", str(path), "-o", str(tmp_path / "issue.md")]) == 0
    text = (tmp_path / "issue.md").read_text()
    assert "- **Robust accuracy**: 60.90%" in text and "seed 0, n_ex 10000" in text
    custom = replace(full_run(), model="my-own-net")
    with pytest.raises(UnknownModelError):
        mi.submission_text([custom])
    with pytest.raises(BadInputError, match="at least one"):
        mi.submission_text([])


def test_source_links(monkeypatch):
    from zoo.registry import Source

    monkeypatch.setenv("SCORE_ZOO_HUB_ORG", "my-lab")
    pinned = Source(kind="hub", repo_id="{org}/score-wrn-28-10-cifar10-linf", filename="model.safetensors",
                    revision="0123abc")
    assert mi.source_link(pinned) == \
        "https://huggingface.co/my-lab/score-wrn-28-10-cifar10-linf/blob/0123abc/model.safetensors"
    assert mi.source_link(Source(kind="gdrive", file_id="XYZ")) == "https://drive.google.com/file/d/XYZ"
    # an unpinned Hub repo is not published yet, so the submission leaves it out
    text = mi.submission_text([full_run()])
    assert "huggingface.co" not in text and "WRN-28-10_cifar10.pt" in text


@pytest.mark.parametrize("provenance, says", [
    ("pinned", "evaluated: released checkpoint (sha256 " + "ab" * 32 + ")"),
    ("local-release", "evaluated: released checkpoint (sha256 " + "ab" * 32 + ")"),
    ("local-unverified", "evaluated: local file, not verified against a release (sha256 " + "ab" * 32 + ")"),
    ("first-use", "evaluated: downloaded file, not verified against a release (trusted on first use"),
    (None, "evaluated: checkpoint not verified against a release (the record predates provenance)"),
])
def test_submission_says_whether_the_weights_are_a_release(provenance, says):
    text = mi.submission_text([full_run(provenance=provenance)])
    assert says in text
    assert ("released checkpoint" in text) == (provenance in ("pinned", "local-release"))


def test_model_info_keeps_robustbench_keys_whatever_the_provenance():
    for provenance in ("pinned", "local-unverified", None):
        entry = mi.model_info(full_run(provenance=provenance))
        assert tuple(entry) == mi.MODEL_INFO_KEYS
