"""--threat corruptions: stand-in CIFAR-10-C folders in the real layout (<corruption>.npy with 5 x N images,
labels.npy), served as a tar by a loopback HTTP server (Range requests, as Zenodo answers them), evaluated end
to end and compared with a direct computation. The real Zenodo download is not exercised (no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from tests.support import helpers as h
from tests.support.servers import LoopbackServer
from zoo import constants
from zoo.errors import DataError, DownloadError, OfflineError
from zoo.evaluate import corruptions, corruptions_data as cd, runner
from zoo.evaluate.record import RunRecord

N = 8   # images per severity


def standin_images(n: int = N, seed: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Clean uint8 NHWC images, their labels, and 15 corruptions x 5 severities of them (noise growing with
    the severity, a different pattern per corruption): what CIFAR-10-C's files hold, small."""
    x, y = h.synthetic_images(n, seed=seed)
    clean = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    rng = np.random.default_rng(0)
    images = {}
    for ci, name in enumerate(cd.CORRUPTIONS):
        blocks = []
        for severity in cd.SEVERITIES:
            noise = rng.normal(0, 12 * severity * (1 + ci % 3), size=clean.shape)
            blocks.append(np.clip(clean.astype(np.float64) + noise, 0, 255).astype(np.uint8))
        images[name] = np.concatenate(blocks)
    return images, np.tile(y.numpy().astype(np.int64), 5), clean


def make_tar(folder) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname="CIFAR-10-C")
    return buffer.getvalue()


class ZenodoStandIn(LoopbackServer):
    """GET /<record>/files/<name> with Range support; ``mode``: ok | truncate (Content-Length promises more).
    ``ranges``: the Range header of each request (None without one)."""

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.ranges = payload, "ok", []
        super().__init__()

    def handle(self, req, method: str, body: bytes) -> None:
        self.ranges.append(req.headers.get("Range"))
        if method != "GET" or not req.path.startswith("/2535967/files/CIFAR-10-C.tar"):
            return req.reply(404)
        start = 0
        if req.headers.get("Range"):
            start = int(req.headers["Range"].split("=")[1].split("-")[0])
            if start >= len(self.payload):
                return req.reply(416)
        body = self.payload[start:]
        sent = body[: len(body) // 2] if self.mode == "truncate" else body
        req.reply(206 if start else 200, sent, length=len(body))


@pytest.fixture
def standin(tmp_path, monkeypatch):
    images, labels, clean = standin_images()
    folder = cd.write_standin(tmp_path / "src" / "CIFAR-10-C", images, labels)
    payload = make_tar(folder)
    server = ZenodoStandIn(payload)
    monkeypatch.setenv(constants.ZENODO_URL_ENV, server.url)
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCORE_ZOO_HTTP_TIMEOUT", "10")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(cd.ARCHIVES, "cifar10",
                        dataclasses.replace(cd.ARCHIVES["cifar10"], md5=hashlib.md5(payload).hexdigest()))
    clean_file = h.write_npz(tmp_path / "clean.npz", torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255,
                             torch.from_numpy(labels[:N]))
    yield {"server": server, "folder": folder, "images": images, "labels": labels, "clean": clean,
           "clean_file": clean_file, "payload": payload, "tmp": tmp_path}
    server.stop()


def direct_accuracies(model, images, labels, n=N) -> dict[str, list[float]]:
    """Each set's accuracy computed directly, in %."""
    out = {}
    with torch.no_grad():
        for name in cd.CORRUPTIONS:
            accs = []
            for s in range(5):
                x = torch.from_numpy(images[name][s * N: s * N + n]).permute(0, 3, 1, 2).float() / 255
                accs.append(100.0 * (model(x).argmax(1).numpy() == labels[:n]).mean())
            out[name] = accs
    return out


def run_kwargs(s, **extra):
    return {"threat": "corruptions", "data": str(s["clean_file"]), "data_dir": None, "device": "cpu",
            "batch_size": 3, "chunk_batches": 1, "results_dir": str(s["tmp"] / "results"), "model_label": "tiny",
            "progress": False, **extra}


def test_download_checks_unpacks_and_the_accuracy_is_the_direct_one(standin, tmp_path):
    model = h.train_tiny_cnn()
    record = runner.run(model, **run_kwargs(standin))
    unpacked = tmp_path / "cache" / "data" / "CIFAR-10-C"
    assert (unpacked / "labels.npy").is_file() and not (tmp_path / "cache" / "data" / "CIFAR-10-C.tar.part").exists()
    direct = direct_accuracies(model, standin["images"], standin["labels"])
    assert record.kind == "corruptions" and record.threat == "corruptions" and record.n_ex == N
    assert list(record.corruptions) == list(cd.CORRUPTIONS)
    for name, accs in direct.items():
        assert [a.correct / a.total * 100 for a in record.corruptions[name]] == pytest.approx(accs)
    assert record.robust.correct / record.robust.total * 100 == pytest.approx(np.mean(list(direct.values())))
    path = tmp_path / "results" / record.relative_path()
    assert RunRecord.read(path).corruptions == record.corruptions
    assert json.loads(path.read_text())["schema_version"] == 2
    arrays = corruptions.read_per_example(tmp_path / "results" / record.relative_path().with_suffix(".npz"))
    assert arrays["correct"].shape == (15, 5, N)


def test_n_ex_takes_the_first_images_of_every_set_as_robustbench(standin, tmp_path):
    model = h.train_tiny_cnn()
    record = runner.run(model, **run_kwargs(standin, n_ex=5))
    direct = direct_accuracies(model, standin["images"], standin["labels"], n=5)
    assert record.n_ex == 5
    for name, accs in direct.items():
        assert [a.correct / a.total * 100 for a in record.corruptions[name]] == pytest.approx(accs)


def test_partial_download_resumes_with_a_range_request(standin, tmp_path):
    base = tmp_path / "dd"
    base.mkdir()
    (base / "CIFAR-10-C.tar.part").write_bytes(standin["payload"][:5000])
    sets = cd.locate("cifar10", None, base)
    assert sets.per_severity == N
    assert standin["server"].ranges[-1] == "bytes=5000-"


def test_checksum_mismatch_deletes_and_writes_nothing(standin, tmp_path, monkeypatch):
    monkeypatch.setitem(cd.ARCHIVES, "cifar10", dataclasses.replace(cd.ARCHIVES["cifar10"], md5="0" * 32))
    with pytest.raises(DownloadError, match="md5"):
        cd.locate("cifar10", None, tmp_path / "dd")
    assert sorted(p.name for p in (tmp_path / "dd").iterdir()) == [".CIFAR-10-C.lock"]   # the download lock


def test_broken_off_download_keeps_the_part_for_resuming_and_no_folder(standin, tmp_path):
    standin["server"].mode = "truncate"
    with pytest.raises(DownloadError, match="ended early|broke off"):
        cd.locate("cifar10", None, tmp_path / "dd")
    assert not (tmp_path / "dd" / "CIFAR-10-C").exists()
    assert 0 < (tmp_path / "dd" / "CIFAR-10-C.tar.part").stat().st_size < len(standin["payload"])
    standin["server"].mode = "ok"
    assert cd.locate("cifar10", None, tmp_path / "dd").per_severity == N


def test_truncated_archive_with_its_checksum_is_refused_unpacked_nowhere(standin, tmp_path, monkeypatch):
    cut = standin["payload"][: len(standin["payload"]) // 3]
    standin["server"].payload = cut
    monkeypatch.setitem(cd.ARCHIVES, "cifar10",
                        dataclasses.replace(cd.ARCHIVES["cifar10"], md5=hashlib.md5(cut).hexdigest()))
    with pytest.raises(DataError, match="cannot be unpacked|is missing|shape"):
        cd.locate("cifar10", None, tmp_path / "dd")
    assert [p.name for p in (tmp_path / "dd").iterdir() if not p.name.endswith((".part", ".lock"))] == []


def test_unreachable_server_and_offline_mode_name_data_root(standin, tmp_path, monkeypatch):
    monkeypatch.setenv(constants.ZENODO_URL_ENV, "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match="cannot reach") as err:
        cd.locate("cifar10", None, tmp_path / "dd")
    assert "--data-root" in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline"):
        cd.locate("cifar10", None, tmp_path / "dd")


def test_data_root_missing_file_and_wrong_shapes_are_clear(standin, tmp_path):
    folder = standin["folder"]
    assert cd.locate("cifar10", folder.parent, None).folder == folder   # the parent or the folder itself
    assert cd.locate("cifar10", folder, None).per_severity == N
    (folder / "fog.npy").unlink()
    with pytest.raises(DataError, match="fog.npy is missing"):
        cd.locate("cifar10", folder, None)
    np.save(folder / "fog.npy", np.zeros((5 * N, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match=r"fog.npy: shape \(40, 32, 32\)"):
        cd.locate("cifar10", folder, None)
    np.save(folder / "labels.npy", np.zeros(7, dtype=np.int64))
    with pytest.raises(DataError, match="labels.npy"):
        cd.locate("cifar10", folder, None)


def test_clean_images_must_be_the_ones_the_sets_were_made_from(standin, tmp_path):
    x, y = h.synthetic_images(N, seed=99)
    other = h.write_npz(tmp_path / "other.npz", x, (y + 1) % 10)
    with pytest.raises(DataError, match="labels"):
        runner.run(h.train_tiny_cnn(), **run_kwargs(standin, data=str(other), data_root=str(standin["folder"])))


def test_killed_run_resumes_by_chunk_with_the_same_record(standin, tmp_path, monkeypatch):
    model = h.train_tiny_cnn()
    kwargs = run_kwargs(standin, data_root=str(standin["folder"]), run_dir=str(tmp_path / "run"))
    real, calls = corruptions._predict, {"n": 0}

    def dying(setup, x):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(setup, x)

    monkeypatch.setattr(corruptions, "_predict", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run(model, **kwargs)
    state = corruptions.State.load(corruptions.state_path(tmp_path / "run", 0, 1))
    assert state.next_set * N + state.pos > 0 and not state.done
    monkeypatch.setattr(corruptions, "_predict", real)
    resumed = runner.run(model, **kwargs)
    fresh = runner.run(model, **run_kwargs(standin, data_root=str(standin["folder"]), run_dir=str(tmp_path / "r2"),
                                           results_dir=str(tmp_path / "results2")))
    assert resumed.corruptions == fresh.corruptions and resumed.clean == fresh.clean


def test_shards_merge_to_the_unsharded_record(standin, tmp_path):
    model = h.train_tiny_cnn()
    base = run_kwargs(standin, data_root=str(standin["folder"]), run_dir=str(tmp_path / "run"))
    assert runner.run(model, **base, shard=(0, 2)) is None
    sharded = runner.run(model, **base, shard=(1, 2))
    whole = runner.run(model, **run_kwargs(standin, data_root=str(standin["folder"]),
                                           results_dir=str(tmp_path / "results2")))
    assert sharded.corruptions == whole.corruptions and sharded.robust == whole.robust


def test_options_that_do_not_apply_are_refused(standin):
    from zoo.errors import BadInputError
    with pytest.raises(BadInputError, match="eps"):
        runner.run(h.train_tiny_cnn(), **run_kwargs(standin, eps="8/255", data_root=str(standin["folder"])))
    with pytest.raises(DataError, match="no common-corruptions"):
        cd.archive_for("custom")


@pytest.mark.skipif(not h.SHARED_DATA.exists() or not h.CNN_A_ADV.exists(), reason="needs ../shared")
def test_real_net_on_imagecorruptions_standins_end_to_end(tmp_path, monkeypatch):
    imagecorruptions = pytest.importorskip("imagecorruptions", reason="pip install imagecorruptions")
    n = 10
    x, y = h.shared_cifar(n)
    clean = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    rng = np.random.default_rng(0)

    def corrupt(img, name, severity):
        try:
            return np.asarray(imagecorruptions.corrupt(img, corruption_name=name, severity=severity),
                              dtype=np.uint8)[:32, :32, :3]
        except (AttributeError, TypeError):   # 1.1.2's fog and glass_blur predate NumPy 2 / scikit-image 0.19
            noise = rng.normal(0, 10 * severity, size=img.shape)
            return np.clip(img + noise, 0, 255).astype(np.uint8)

    images = {name: np.concatenate([np.stack([corrupt(img, name, s) for img in clean]) for s in cd.SEVERITIES])
              for name in cd.CORRUPTIONS}
    labels = np.tile(y.numpy(), 5)
    folder = cd.write_standin(tmp_path / "CIFAR-10-C", images, labels)
    data = h.write_npz(tmp_path / "clean.npz", x, y)
    net = h.cnn_a_adv()
    record = runner.run(net, threat="corruptions", data=str(data), data_root=str(folder), device="cpu",
                        results_dir=str(tmp_path / "results"), model_label="cnn-a-adv", progress=False)
    direct = []
    with torch.no_grad():
        for name in cd.CORRUPTIONS:
            for s in range(5):
                xs = torch.from_numpy(images[name][s * n:(s + 1) * n]).permute(0, 3, 1, 2).float() / 255
                direct.append((net(xs).argmax(1) == y).float().mean().item())
    assert record.robust.correct / record.robust.total == pytest.approx(np.mean(direct))
    assert record.clean.percent > 40


def test_concurrent_shards_download_once(standin, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: cd.locate("cifar10", None, tmp_path / "dd").per_severity, range(3)))
    assert results == [N, N, N]
    assert len(standin["server"].requests) == 1


def test_cli_registry_checkpoint_shards_resume_and_merge(standin, tmp_path, monkeypatch, capsys):
    from zoo.evaluate import cli
    h.use_registry(monkeypatch, h.tiny_registry(tmp_path))
    ckpt = h.tiny_wrn_checkpoint(tmp_path)
    run_dir = tmp_path / "run"
    base = ["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--threat", "corruptions",
            "--data", str(standin["clean_file"]), "--data-root", str(standin["folder"]), "--batch-size", "4",
            "--device", "cpu", "--results-dir", str(tmp_path / "results"), "--no-progress", "--run-dir", str(run_dir)]
    assert cli.main(base + ["--shard", "0/2"]) == 2   # cifar10 linf and l2 checkpoints: which one?
    assert "--trained-threat" in capsys.readouterr().err
    base += ["--trained-threat", "linf"]
    assert cli.main(base + ["--shard", "0/2"]) == 0
    assert "once every shard is" in capsys.readouterr().out
    assert cli.main(["--resume", str(run_dir), "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert "shot_noise" in out and "corruptions" in out and "trained for linf" in out
    [first] = (tmp_path / "results").rglob("*.json")
    assert cli.main(["merge", str(run_dir)]) == 0
    record = RunRecord.read(first)
    assert record.kind == "corruptions" and record.trained_threat == "linf" and record.extra["shards"] == 2
