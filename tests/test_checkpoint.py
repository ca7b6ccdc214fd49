"""Every upstream checkpoint layout loads to the same weights; anything else fails with a clear error."""

import os

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo.checkpoint import load_into, read_state_dict, sniff_format
from zoo.errors import ArchitectureMismatchError, CorruptCheckpointError
from zoo.models import WideResNet


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    net = WideResNet(depth=10, width=1)
    for p in net.parameters():
        p.data.normal_()
    return net.state_dict()


def _save_all_formats(state, folder):
    paths = {}
    authors = {"model_state_dict": {f"module.0.{k}": v for k, v in state.items()},
               "unaveraged_model_state_dict": {f"module.0.{k}": v * 0 for k, v in state.items()}}
    paths["authors"] = folder / "WRN_cifar10.pt"
    torch.save(authors, paths["authors"])
    paths["robustbench"] = folder / "rb.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, paths["robustbench"])
    paths["bare"] = folder / "bare.pth"
    torch.save(dict(state), paths["bare"])
    paths["legacy-pickle"] = folder / "legacy.pt"
    torch.save(dict(state), paths["legacy-pickle"], _use_new_zipfile_serialization=False)
    paths["safetensors"] = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    return paths


@pytest.mark.parametrize("fmt", ["authors", "robustbench", "bare", "legacy-pickle", "safetensors"])
def test_every_format_gives_identical_weights(weights, tmp_path, fmt):
    path = _save_all_formats(weights, tmp_path)[fmt]
    state = read_state_dict(path)
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # authors: the averaged model, not the other
    net = load_into(WideResNet(depth=10, width=1), state)
    assert torch.equal(net.init_conv.weight, weights["init_conv.weight"])


def test_load_with_checkpoint_override_uses_registry_architecture(tmp_path):
    model = zoo.info("score-wrn-28-10")
    from zoo.models import build_model
    state = build_model(model, model.variant()).state_dict()
    path = tmp_path / "wrn.pt"
    torch.save({"model_state_dict": {f"module.0.{k}": v for k, v in state.items()}}, path)
    net = zoo.load("score-wrn-28-10", checkpoint=path)
    assert not net.training and net.checkpoint_info.source == "local file"
    assert net.checkpoint_info.sha256 == __import__("zoo.fileio").fileio.sha256_file(path)


def test_other_architecture_names_the_keys(weights):
    with pytest.raises(ArchitectureMismatchError) as err:
        load_into(WideResNet(depth=16, width=1), dict(weights))
    assert "missing key(s): layer.0.block.1" in str(err.value)
    wrong_shape = (r"2 key\(s\) of the wrong shape: logits.bias \(10,\) vs \(100,\), "
                   r"logits.weight \(10, 64\) vs \(100, 64\)")
    with pytest.raises(ArchitectureMismatchError, match=wrong_shape):
        load_into(WideResNet(depth=10, width=1, num_classes=100), dict(weights))
    extra = dict(weights, **{"head.weight": torch.zeros(1)})
    with pytest.raises(ArchitectureMismatchError, match="1 unexpected key\\(s\\): head.weight"):
        load_into(WideResNet(depth=10, width=1), extra)


def test_html_page_is_detected_before_unpickling(tmp_path):
    page = tmp_path / "WRN-28-10_cifar10.pt"
    page.write_text("\n  <!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>")
    with pytest.raises(CorruptCheckpointError, match="HTML page"):
        read_state_dict(page)


@pytest.mark.parametrize("fmt", ["authors", "safetensors"])
@pytest.mark.parametrize("cut", [10, 0.5])
def test_truncated_files_are_detected(weights, tmp_path, cut, fmt):
    good = _save_all_formats(weights, tmp_path)[fmt]
    data = good.read_bytes()
    bad = tmp_path / "cut.pt"
    bad.write_bytes(data[: int(cut if cut > 1 else len(data) * cut)])
    with pytest.raises(CorruptCheckpointError, match="truncated|damaged|unreadable safetensors"):
        read_state_dict(bad)


def test_garbage_is_rejected(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    with pytest.raises(CorruptCheckpointError, match="not a PyTorch or safetensors"):
        sniff_format(junk)


class _RunsCode:
    """A pickle payload that would create a marker file if unpickled unsafely."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_that_runs_code_is_refused(tmp_path, zipped):
    marker = tmp_path / "pwned"
    _RunsCode.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode()}, path,
               _use_new_zipfile_serialization=zipped)
    assert not marker.exists()
    with pytest.raises(CorruptCheckpointError, match="refuses to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CorruptCheckpointError, match="holds no state dict"):
        read_state_dict(path)

