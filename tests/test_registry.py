"""checkpoints.yaml schema: every entry complete, typed, with no unknown keys (cf. torchvision's weight test)."""

import copy

import pytest
import yaml

import zoo
from zoo import domain, registry
from zoo.errors import RegistryError, UnknownModelError, UnknownVariantError

PAPER_NUMBERS = {  # (model, dataset): (clean, AutoAttack) as reported by the authors / RobustBench
    ("score-wrn-28-10", "cifar10"): (88.61, 61.04),
    ("score-wrn-70-16", "cifar10"): (89.01, 63.35),
    ("score-wrn-28-10", "cifar100"): (63.66, 31.08),
    ("score-wrn-70-16", "cifar100"): (65.56, 33.05),
}
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@pytest.fixture(scope="module")
def raw():
    with open(registry.registry_path(), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_registry_file_parses_and_lists_the_four_checkpoints():
    models = registry.load_registry()
    assert sorted(models) == ["score-wrn-28-10", "score-wrn-70-16"]
    pairs = {(name, v.dataset) for name, m in models.items() for v in m.variants}
    assert pairs == set(PAPER_NUMBERS)


@pytest.mark.parametrize("name,dataset", sorted(PAPER_NUMBERS))
def test_entry_metadata(name, dataset):
    model = zoo.info(name)
    v = model.variant(dataset, "linf")
    assert v.eps == "8/255" and v.eps_value == pytest.approx(8 / 255)
    assert (v.reported["clean_acc"], v.reported["autoattack_acc"]) == PAPER_NUMBERS[(name, dataset)]
    assert (v.mean, v.std) == NORMALISATION[dataset]
    assert v.num_classes == (10 if dataset == "cifar10" else 100)
    depth, width = (28, 10) if name == "score-wrn-28-10" else (70, 16)
    assert (model.architecture.depth, model.architecture.width, model.architecture.activation) == (depth, width, "silu")
    assert model.paper.venue == "ICML 2022" and "2202.10103" in model.paper.link
    assert [s.kind for s in v.sources] == ["hub", "url", "gdrive"]
    url = v.sources[1].url
    assert url.startswith("https://ml.cs.tsinghua.edu.cn/~tianyu/SCORE/checkpoints/")
    assert url.endswith(f"WRN-{depth}-{width}_{dataset}.pt")
    for s in v.sources:  # hashes stay null until a real download measured them
        assert s.sha256 is None or len(s.sha256) == 64


@pytest.mark.parametrize("name", ["score-wrn-28-10", "score-wrn-70-16"])
def test_robustbench_spelling_is_kept_exactly(name):
    # RobustBench's model_info files for all four SCORE entries: name with its leading space, the PDF link
    spelled = zoo.info(name).robustbench
    assert spelled.name == " Robustness and Accuracy Could Be Reconcilable by (Proper) Definition"
    assert spelled.link == "https://arxiv.org/pdf/2202.10103.pdf"


def test_robustbench_block_is_optional(raw):
    data = copy.deepcopy(raw)
    for model in data["models"].values():
        model.pop("robustbench", None)
    assert registry.parse_registry(data)["score-wrn-28-10"].robustbench is None


def test_hub_org_is_configurable(monkeypatch):
    src = zoo.info("score-wrn-28-10").variant().sources[0]
    assert src.resolved_repo_id == "score-zoo/score-wrn-28-10-cifar10-linf"
    monkeypatch.setenv("SCORE_ZOO_HUB_ORG", "my-lab")
    assert src.resolved_repo_id == "my-lab/score-wrn-28-10-cifar10-linf"


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["models"]["score-wrn-28-10"].update(colour="red"), "unknown key"),
    (lambda d: d["models"]["score-wrn-28-10"].pop("robustbench_id"), "missing key"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0].update(num_classes="10"), "num_classes"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0].update(eps="eight"), "eps"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0].update(dataset="mnist"), "dataset"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0]["sources"][0].update(sha256="abc"), "sha256"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0]["sources"][1].update(kind="ftp"), "kind"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"][0]["sources"][2].update(url="x"), "unknown key"),
    (lambda d: d["models"]["score-wrn-28-10"]["robustbench"].update(title="x"), "robustbench: unknown key"),
    (lambda d: d["models"]["score-wrn-28-10"]["robustbench"].update(link=None), r"robustbench.link: expected"),
    (lambda d: d["models"]["score-wrn-28-10"]["robustbench"].pop("name"), "robustbench: missing key"),
    (lambda d: d["models"]["score-wrn-28-10"]["variants"].append(
        copy.deepcopy(d["models"]["score-wrn-28-10"]["variants"][0])), "duplicate"),
])
def test_schema_rejects_bad_entries(raw, mutate, message):
    data = copy.deepcopy(raw)
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        registry.parse_registry(data)


def test_robustbench_ids_are_aliases():
    assert registry.resolve_name("Pang2022Robustness_WRN70_16") == "score-wrn-70-16"
    assert zoo.info("pang2022robustness_wrn28_10").name == "score-wrn-28-10"


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="did you mean score-wrn-28-10"):
        registry.resolve_name("score-wrn-28-11")


def test_unknown_variant_lists_what_exists():
    with pytest.raises(UnknownVariantError, match="dataset='cifar100'") as err:
        zoo.info("score-wrn-28-10").variant("imagenet", "linf")
    assert "imagenet" in str(err.value)


def test_list_models_wildcards_and_filters():
    assert zoo.list_models("score-*") == ["score-wrn-28-10", "score-wrn-70-16"]
    assert zoo.list_models("*70*") == ["score-wrn-70-16"]
    assert zoo.list_models("Pang2022*") == ["score-wrn-28-10", "score-wrn-70-16"]
    assert zoo.list_models(dataset="cifar100", threat="linf") == ["score-wrn-28-10", "score-wrn-70-16"]
    assert zoo.list_models(threat="l2") == []


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.5", 0.5), (12, 12.0), (" 4/255 ", 4 / 255),
                                        ("0.5/255", 0.5 / 255), ("1e-3", 1e-3)])
def test_parse_eps(text, value):
    assert domain.parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["eight", "8/0", "", "8//255", "nan", "inf/255", "8/255/2"])
def test_parse_eps_rejects(text):
    with pytest.raises(ValueError, match="8/255"):
        domain.parse_eps(text)
