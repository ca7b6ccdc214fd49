"""Shared pieces for the zoo-eval tests: a tiny CNN trained in seconds, data files, the real shared models.

The tiny CNN scales its logits by 30: its cross-entropy saturates on confident points, so APGD-CE misses
some examples that APGD-T (scale-invariant targeted DLR loss) then breaks. That is the situation in which
the stage order matters, which is what the faithfulness tests need.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data" / "cifar10_test_first1000.npz"
CNN_A_ADV = SHARED / "models" / "cifar10_cnn_a_adv_at2px_sdpfo.pth"

TINY_EPS = 0.008          # APGD-CE leaves points that APGD-T breaks at this radius
LOGIT_SCALE = 30.0


def synthetic_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten noisy colour-pattern classes, 3x32x32 in [0, 1], contiguous NCHW."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    g2 = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g2)
    x = 0.12 * (templates[y] - 0.5) + 0.5 + 0.3 * torch.randn(n, 3, 32, 32, generator=g2)
    return x.clamp(0, 1).contiguous(), y


class TinyCNN(nn.Module):
    def __init__(self, logit_scale: float = LOGIT_SCALE):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 4, 2, 1)
        self.conv2 = nn.Conv2d(8, 16, 4, 2, 1)
        self.fc = nn.Linear(16 * 8 * 8, 10)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x - 0.5))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1)) * self.logit_scale


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict:
    return {k: v.clone() for k, v in _train().state_dict().items()}


def train_tiny_cnn() -> TinyCNN:
    """A fresh copy of the trained tiny CNN (trained once per process, about two seconds on one core)."""
    model = TinyCNN()
    model.load_state_dict(_trained_state())
    return model.eval()


def _train() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN(logit_scale=1.0)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    x, y = synthetic_images(2000, seed=1)
    for _ in range(4):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 100):
            idx = perm[i:i + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.logit_scale = LOGIT_SCALE
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Tests share two cores with other jobs: one intra-op thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_cnn_from(path: Path) -> TinyCNN:
    model = TinyCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
    return path


def per_example(record, results_dir: Path):
    """The per-example arrays (PerExample) of ``record`` written under ``results_dir``."""
    from zoo.evaluate.record import PerExample, per_example_path

    return PerExample.read(per_example_path(Path(results_dir) / record.relative_path()))


def tiny_cnn_files(folder: Path, n: int, seed: int) -> tuple[TinyCNN, Path, Path]:
    """The trained tiny CNN, its weights saved as ``folder/tiny.pt`` (for --checkpoint) and n synthetic images
    as ``folder/d.npz`` (for --data): the set-up of the tests that run zoo-eval from files."""
    model = train_tiny_cnn()
    torch.save(model.state_dict(), folder / "tiny.pt")
    x, y = synthetic_images(n, seed=seed)
    return model, folder / "tiny.pt", write_npz(folder / "d.npz", x, y)


# ---------------------------------------------------------------- the real shared CNN-A-Adv (MODELS.md)

class Normalize(nn.Module):
    """Per-channel (x - mean) / std, as the shared nets expect their inputs."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def cnn_a_adv() -> nn.Module:
    """CNN-A-Adv from SDP-FO, rebuilt from the layer list in shared/models/MODELS.md."""
    net = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2048, 100), nn.ReLU(), nn.Linear(100, 10))
    net.load_state_dict(torch.load(CNN_A_ADV, map_location="cpu", weights_only=True))
    mean = tuple(v / 255 for v in (125.3, 123.0, 113.9))
    std = tuple(v / 255 for v in (63.0, 62.1, 66.7))
    return nn.Sequential(Normalize(mean, std), net).eval()


def shared_cifar(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(SHARED_DATA) as d:
        x = torch.from_numpy(d["x"][:n]).permute(0, 3, 1, 2).float().div(255).contiguous()
        y = torch.from_numpy(d["y"][:n]).long()
    return x, y


# ---------------------------------------------------------------- the reference, called directly

def reference_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
                  version: str = "custom", attacks=None, seed: int = 0, batch_size: int) -> dict:
    """pyautoattack's run_standard_evaluation, plus per-example robust flags recovered from its output."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks, seed=seed, device="cpu")
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
    changed = (x_adv != x).flatten(1).any(dim=1)
    return {"x_adv": x_adv, "y_adv": y_adv, "robust": (y_adv == y) & clean_correct,
            "clean_correct": clean_correct, "changed": changed}


# ---------------------------------------------------------------- a tiny registry for CLI tests

TINY_REGISTRY_MODEL = "tiny-wrn"


def tiny_registry(tmp_path: Path) -> Path:
    """checkpoints.yaml with one WRN-10-1 entry (cifar10 linf/l2, cifar100 linf); sources never used."""
    source = {"kind": "url", "url": "http://127.0.0.1:9/none.pt", "sha256": None, "size": None}

    def variant(dataset, threat, eps, classes):
        return {"dataset": dataset, "threat": threat, "eps": eps, "num_classes": classes,
                "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616],
                "reported": {"clean_acc": 50.0, "autoattack_acc": 20.0}, "sources": [source]}

    doc = {"schema_version": 1, "models": {TINY_REGISTRY_MODEL: {
        "robustbench_id": "Tiny2024_WRN10_1",
        "paper": {"title": "t", "authors": ["a"], "venue": "v", "link": "http://127.0.0.1/"},
        "training": {"additional_data": False, "footnote": None},
        "architecture": {"name": "dm_wide_resnet", "label": "WRN-10-1", "depth": 10, "width": 1, "activation": "silu"},
        "variants": [variant("cifar10", "linf", "8/255", 10), variant("cifar10", "l2", "0.5", 10),
                     variant("cifar100", "linf", "8/255", 100)]}}}
    path = tmp_path / "checkpoints.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def tiny_wrn_checkpoint(tmp_path: Path, num_classes: int = 10, nan: bool = False, seed: int = 0) -> Path:
    from zoo.models import WideResNet

    torch.manual_seed(seed)
    net = WideResNet(num_classes=num_classes, depth=10, width=1)
    if nan:
        with torch.no_grad():
            net.logits.bias.fill_(float("nan"))
    path = tmp_path / f"tiny-wrn-{num_classes}{'-nan' if nan else ''}.pt"
    torch.save(net.state_dict(), path)
    return path


def use_registry(monkeypatch, path: Path) -> None:
    import zoo.registry
    monkeypatch.setattr(zoo.registry, "registry_path", lambda: path)


# ---------------------------------------------------------------- subprocesses

def python_subprocess(code: str, env: dict | None = None, args_after: list[str] = (), **kwargs) -> subprocess.Popen:
    """A fresh interpreter running ``code`` (then ``args_after`` as sys.argv[1:]) with the repository root, so
    ``tests.support``, importable (after any PYTHONPATH entries, so that an installed zoo comes first)."""
    import os
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args_after], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def api_run_code(model_path: Path, run_kwargs: dict) -> str:
    """Source for a subprocess that evaluates the saved tiny CNN through zoo.evaluate.run."""
    return (
        "import json, torch, logging\n"
        "torch.set_num_threads(1)\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from tests.support import helpers as eval_helpers\n"
        "from zoo.evaluate import run\n"
        f"model = eval_helpers.tiny_cnn_from({str(model_path)!r})\n"
        f"kwargs = json.loads({json.dumps(run_kwargs)!r})\n"
        "if isinstance(kwargs.get('shard'), list): kwargs['shard'] = tuple(kwargs['shard'])\n"
        "record = run(model, **kwargs)\n"
        "print('RECORD', None if record is None else record.run_id)\n"
    )


def tiny_registry_inputs(tmp_path: Path, monkeypatch, n: int = 6, seed: int = 5
                         ) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """Use the tiny registry; return its checkpoint, a data file of n images labelled with the net's own
    predictions (so every point is correct and the attack has work to do), and those images and labels."""
    use_registry(monkeypatch, tiny_registry(tmp_path))
    ckpt = tiny_wrn_checkpoint(tmp_path)
    x, _ = synthetic_images(n, seed=seed)
    from zoo.models import WideResNet
    net = WideResNet(num_classes=10, depth=10, width=1)
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
    return ckpt, write_npz(tmp_path / "d.npz", x, y), x, y


# ---------------------------------------------------------------- imports a command makes

PROBE = """
import json, sys
from {module} import main
code = main({argv})
print(json.dumps({{"code": code, "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
"""


def run_without_torch(module: str, argv: list[str], tmp_path: Path) -> None:
    """Run ``module``'s ``main(argv)`` in a fresh interpreter; it must succeed without importing torch."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=repr(argv))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr[-3000:]
    assert result["torch"] == [], f"{module} {argv} imported torch"
