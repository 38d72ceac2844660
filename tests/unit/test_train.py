"""training.train.loop and training.sample on the test-tiny preset: learning, resume, NaN guard, data
selection, provenance, DDP under torchrun (two gloo processes) and sampling."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import sample as sample_mod
from training.data import sources
from training.data.sources import VolumeSet, load_volume_dir, resolve_data
from training.errors import TrainingError
from training.presets import config_from_preset
from training.train import loop as train_mod
from training.train.checkpoint import checkpoint_path
from training.train.loop import prepare_volumes, train
from triage.model.glow import Glow

REPO = Path(__file__).resolve().parents[2]
SHAPE = (8, 16, 16)  # test-tiny's image_shape


def blobs(n: int, shape: tuple[int, ...] = SHAPE, seed: int = 0) -> list[np.ndarray]:
    """Smooth bright blobs on a dark, slightly noisy background: structure a flow can learn fast."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        c = [rng.uniform(s * 0.25, s * 0.75) for s in shape]
        r = rng.uniform(2.0, 4.0) * shape[-1] / 16
        d = sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / r**2
        v = 20 + 90 * np.exp(-d) + rng.normal(0, 2, shape)
        out.append(np.clip(np.round(v), 0, 127).astype(np.uint8))
    return out


def toy_set(n: int = 16, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> VolumeSet:
    return VolumeSet(blobs(n, shape, seed), [f"1.2.826.0.1.{seed}.{i}" for i in range(n)])


def write_npz_dir(folder: Path, vs: VolumeSet) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (v, uid) in enumerate(zip(vs.volumes, vs.ids, strict=True)):
        sub = folder / f"s{k % 3}"  # nested: the reader searches recursively
        sub.mkdir(exist_ok=True)
        np.savez_compressed(sub / f"vol{k:03d}.npz", data=v, study_uid=np.str_(uid))


def quick(vs: VolumeSet, out: Path, **kw) -> train_mod.TrainResult:
    kw.setdefault("role", "normal")
    kw.setdefault("progress", False)
    kw.setdefault("log_every", 0)
    kw.setdefault("device", "cpu")
    return train(vs, "test-tiny", out, **kw)


def params_equal(a: Glow, b: Glow) -> float:
    """Largest absolute difference over all parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


# --------------------------------------------------------------------------------------------------


def test_loss_goes_down_and_warm_start_keeps_what_was_learned(tmp_path: Path) -> None:
    vs = toy_set(16)
    res = quick(vs, tmp_path / "m0.pt", steps=60)
    first, last = np.mean(res.losses[:10]), np.mean(res.losses[-10:])
    assert all(math.isfinite(v) for v in res.losses)
    assert last < first - 0.5, (first, last)
    assert res.final_bpd == pytest.approx(last, rel=1e-9)
    assert res.best_bpd <= res.final_bpd + 1e-9

    # warm start (nightly M1 retrain): starts where the model left off, not from scratch
    warm = quick(vs, tmp_path / "warm.pt", steps=3, init_from=tmp_path / "m0.pt", role="mixture")
    assert warm.losses[0] < first - 0.4, (warm.losses[0], first)
    info = Glow.load(tmp_path / "warm.pt").extra_info
    assert info["init_from"]["path"] == str(tmp_path / "m0.pt")
    assert len(info["init_from"]["sha256"]) == 64
    assert info["role"] == "mixture"

    # a model of another architecture cannot be the warm start of this preset
    other = Glow(config_from_preset("test-tiny", width=4))
    other.save(tmp_path / "other.pt")
    with pytest.raises(TrainingError, match="width"):
        quick(vs, tmp_path / "x.pt", steps=1, init_from=tmp_path / "other.pt")


def test_output_loads_and_carries_provenance(tmp_path: Path) -> None:
    vs = toy_set(6)
    res = quick(vs, tmp_path / "sub" / "m.pt", steps=4, seed=3)
    model = Glow.load(tmp_path / "sub" / "m.pt")
    info = model.extra_info
    assert info["role"] == "normal" and info["preset"] == "test-tiny"
    assert info["steps"] == 4 and info["seed"] == 3 and info["nan_restores"] == 0
    assert info["data"]["count"] == 6
    assert info["data"]["ids_sha256"] == train_mod.ids_digest(vs.ids)
    assert info["started"] <= info["finished"]
    assert info["final_bpd"] == pytest.approx(res.final_bpd)
    assert info["software"]["torch"] == str(torch.__version__)
    assert info["software"]["glowtriage"]
    json.dumps(info)  # JSON-able as it is
    s = res.summary()
    assert json.loads(json.dumps(s))["steps"] == 4 and s["volumes"] == 6 and s["nan_restores"] == 0
    # the model scores: finite bits/dim on a volume in eval mode
    model.eval()
    x = torch.from_numpy(vs.volumes[0])[None, None]
    assert torch.isfinite(model.bits_per_dim(x)).all()


def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    vs = toy_set(10)  # 10 volumes, batch 4: epochs end mid-batch, so the order position matters
    straight = quick(vs, tmp_path / "a.pt", steps=20, checkpoint_every=5, seed=1)

    def crash(step: int, model: Glow, noise: torch.Tensor) -> None:
        if step == 13:
            raise KeyboardInterrupt("simulated crash")

    out = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        quick(vs, out, steps=20, checkpoint_every=5, seed=1, hook=crash)
    assert not out.exists()
    ck = torch.load(checkpoint_path(out), weights_only=True)
    assert ck["step"] == 10

    resumed = quick(vs, out, steps=20, checkpoint_every=5, seed=1, resume=True)
    assert resumed.resumed_from == 10
    assert params_equal(Glow.load(tmp_path / "a.pt"), Glow.load(out)) <= 1e-6
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=0, atol=1e-6)
    assert Glow.load(out).extra_info["resumed_from"] == 10

    # a checkpoint of another run (other seed) is refused, not silently mixed in
    with pytest.raises(TrainingError, match="seed"):
        quick(vs, out, steps=20, checkpoint_every=5, seed=2, resume=True)


def test_nan_loss_restores_last_good_state_halves_lr_and_goes_on(tmp_path: Path) -> None:
    def corrupt_batch(step: int, model: Glow, noise: torch.Tensor) -> None:
        if step == 7:
            noise[0].fill_(float("nan"))

    res = quick(toy_set(8), tmp_path / "m.pt", steps=14, hook=corrupt_batch, nan_cooldown=3)
    assert res.nan_restores == 1
    assert math.isnan(res.losses[7])
    assert all(math.isfinite(v) for i, v in enumerate(res.losses) if i != 7)
    base = config_from_preset("test-tiny").extra["lr"]  # warm-up (5 steps) is over by step 7
    assert res.lrs[6] == pytest.approx(base)
    assert res.lrs[8] == pytest.approx(base / 2)  # halved ...
    assert res.lrs[12] == pytest.approx(base)  # ... for nan_cooldown good steps
    assert res.updates == 13
    assert Glow.load(tmp_path / "m.pt").extra_info["nan_restores"] == 1


def test_cosine_schedule_warms_up_decays_to_zero_and_fine_tunes_at_finetune_lr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, fine = 2e-3, 4e-4
    monkeypatch.setattr(train_mod, "config_from_preset", lambda name: config_from_preset(
        name, lr=base, finetune_lr=fine, lr_schedule="cosine", warmup_steps=4))
    vs = toy_set(8)
    res = quick(vs, tmp_path / "m0.pt", steps=20)
    lrs = np.array(res.lrs)
    assert lrs[:4] == pytest.approx(base * np.arange(1, 5) / 4)  # linear warm-up
    assert lrs[4] == pytest.approx(base)  # the peak, then a cosine down to ~0 at the last step
    assert np.all(np.diff(lrs[4:]) < 0) and lrs[-1] < base * 0.01
    assert lrs[12] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert Glow.load(tmp_path / "m0.pt").extra_info["lr_schedule"] == "cosine"
    # a warm start takes the preset's finetune_lr; an explicit lr wins over both
    ft = quick(vs, tmp_path / "ft.pt", steps=10, init_from=tmp_path / "m0.pt", role="mixture")
    assert max(ft.lrs) == pytest.approx(fine) and Glow.load(tmp_path / "ft.pt").extra_info["lr"] == fine
    own = quick(vs, tmp_path / "own.pt", steps=10, init_from=tmp_path / "m0.pt", lr=1e-4)
    assert max(own.lrs) == pytest.approx(1e-4)
    with pytest.raises(TrainingError, match="positive"):
        quick(vs, tmp_path / "bad.pt", steps=2, lr=-1.0)
    monkeypatch.setattr(train_mod, "config_from_preset", lambda name: config_from_preset(
        name, lr_schedule="linear"))
    with pytest.raises(TrainingError, match="lr_schedule must be 'constant' or 'cosine'"):
        quick(vs, tmp_path / "bad.pt", steps=2)


def test_a_branch_restarts_only_when_the_weights_it_started_from_change(tmp_path: Path) -> None:
    vs = toy_set(8)
    quick(vs, tmp_path / "trunk.pt", steps=4, checkpoint_every=2)
    digest = train_mod.weights_digest(tmp_path / "trunk.pt")
    branch = tmp_path / "m1.pt"
    assert not train_mod.forget_stale_warm_start(branch, tmp_path / "trunk.pt")
    quick(vs, branch, steps=4, init_from=tmp_path / "trunk.pt", checkpoint_every=2, role="mixture")
    assert checkpoint_path(branch).is_file()
    # the trunk file rewritten by a resumed, finished run (new provenance, same weights): keep the branch
    quick(vs, tmp_path / "trunk.pt", steps=4, resume=True)
    assert train_mod.weights_digest(tmp_path / "trunk.pt") == digest
    assert not train_mod.forget_stale_warm_start(branch, tmp_path / "trunk.pt")
    assert checkpoint_path(branch).is_file()
    # the trunk trained further: the branch's checkpoint is of another start, so it goes
    quick(vs, tmp_path / "trunk.pt", steps=6, resume=True)
    assert train_mod.weights_digest(tmp_path / "trunk.pt") != digest
    assert train_mod.forget_stale_warm_start(branch, tmp_path / "trunk.pt")
    assert not checkpoint_path(branch).exists()
    with pytest.raises(TrainingError, match="cannot read model weights"):
        train_mod.weights_digest(tmp_path / "missing.pt")


def test_nan_weights_are_rolled_back(tmp_path: Path) -> None:
    """Weights broken in place (as a bad update would) come back from the in-memory snapshot."""

    def break_weights(step: int, model: Glow, noise: torch.Tensor) -> None:
        if step == 9:
            with torch.no_grad():
                model.levels[0][0].coupling.net[0].weight.fill_(float("nan"))

    res = quick(toy_set(8), tmp_path / "m.pt", steps=15, hook=break_weights, snapshot_every=4)
    assert res.nan_restores == 1 and math.isnan(res.losses[9])
    assert all(math.isfinite(v) for v in res.losses[10:])
    model = Glow.load(tmp_path / "m.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_guard_gives_up_after_consecutive_failures(tmp_path: Path) -> None:
    def always_bad(step: int, model: Glow, noise: torch.Tensor) -> None:
        if step >= 3:
            noise.fill_(float("inf"))

    with pytest.raises(TrainingError, match="3 consecutive non-finite steps"):
        quick(toy_set(8), tmp_path / "m.pt", steps=20, hook=always_bad, max_nan_failures=3)
    assert not (tmp_path / "m.pt").exists()


def test_labels_select_normals_by_study_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vs = toy_set(9, seed=4)
    data = tmp_path / "archive"
    write_npz_dir(data, vs)
    (data / "broken.npz").write_bytes(b"not a zip file")  # one damaged file does not stop training
    np.savez(data / "nodata.npz", other=np.zeros(3))
    normals = set(vs.ids[::3])
    labels = tmp_path / "labels.csv"
    lines = ["study_uid,label,lesion"]
    for uid in vs.ids[:-1]:  # the last study has no label at all
        label, lesion = ("normal", "") if uid in normals else ("abnormal", "bleed")
        lines.append(f"{uid},{label},{lesion}")
    labels.write_text("\n".join(lines) + "\n")

    everything = load_volume_dir(data)
    assert sorted(everything.ids) == sorted(vs.ids)  # keyed by the npz study_uid
    assert len(everything.skipped) == 2 and any("broken.npz" in s for s in everything.skipped)

    chosen = resolve_data(data, labels, "normal")
    assert set(chosen.ids) == normals
    assert set(resolve_data(data, labels, "ABNORMAL").ids) == set(vs.ids[:-1]) - normals

    out = tmp_path / "m0.pt"
    rc = train_mod.main(
        [
            str(data),
            "--role",
            "normal",
            "--preset",
            "test-tiny",
            "--out",
            str(out),
            "--labels",
            str(labels),
            "--only",
            "normal",
            "--steps",
            "2",
            "--no-progress",
            "--device",
            "cpu",
            "--log-every",
            "0",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["volumes"] == len(normals) and summary["steps"] == 2
    info = Glow.load(out).extra_info
    assert info["data"]["count"] == len(normals)
    assert info["data"]["only"] == "normal" and info["data"]["labels"] == str(labels)
    assert info["data"]["ids_sha256"] == train_mod.ids_digest(sorted(normals))

    # --only without --labels, and a label nobody has, are clear errors
    assert (
        train_mod.main(
            [str(data), "--role", "normal", "--preset", "test-tiny", "--out", str(out), "--only", "normal"]
        )
        == 1
    )
    assert "--only normal needs --labels" in capsys.readouterr().err
    with pytest.raises(TrainingError, match=r"no volume .* has label 'lesional'"):
        resolve_data(data, labels, "lesional")


def test_bad_volumes_are_named(tmp_path: Path) -> None:
    cfg = config_from_preset("test-tiny")
    vols = blobs(2)
    vols[1] = vols[1].copy()
    vols[1][0, 0, 0] = 200
    with pytest.raises(TrainingError, match=r"volume b: values up to 200.*7-bit"):
        prepare_volumes(VolumeSet(vols, ["a", "b"]), cfg)
    with pytest.raises(TrainingError, match="volume odd: cannot reduce"):
        prepare_volumes(VolumeSet([np.zeros((8, 16, 24), np.uint8)], ["odd"]), cfg)
    with pytest.raises(TrainingError, match=r"volume f: dtype torch\.float32"):
        prepare_volumes(VolumeSet([np.zeros(SHAPE, np.float32)], ["f"]), cfg)
    # canonical-sized volumes are block-averaged to the preset shape, as scoring does
    x, ids = prepare_volumes(VolumeSet(blobs(2, (16, 32, 32)), ["z", "y"]), cfg)
    assert x.shape == (2, 1, *SHAPE) and x.dtype == torch.uint8 and ids == ["y", "z"]
    with pytest.raises(TrainingError, match="no such"):
        resolve_data(tmp_path / "missing")
    with pytest.raises(TrainingError, match=r"no \.npz volumes"):
        resolve_data(tmp_path)


def test_dicom_folders_go_through_training_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract with training.data.volumes: DICOM input is handed to volumes_from_dicom, whatever it
    returns in the documented shapes becomes a VolumeSet. (training.data.volumes is another module; its own
    tests
    drive real DICOM through triage.assemble.volume, so this only checks the hand-over.)"""
    study = tmp_path / "dicom" / "study1"
    study.mkdir(parents=True)
    (study / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # sniffed by magic, no suffix
    assert sources.contains_dicom(tmp_path / "dicom")
    assert not sources.contains_dicom(tmp_path / "dicom" / "missing")
    calls = []

    def volumes_from_dicom(path, cache_dir, labels=None, only=None):
        calls.append((Path(path), Path(cache_dir), labels, only))
        return {"1.2.3": blobs(1)[0]}

    monkeypatch.setattr(sources, "volumes_from_dicom", volumes_from_dicom)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,label,lesion\n1.2.3,normal,\n")
    vs = resolve_data(tmp_path / "dicom", labels, "normal", cache_dir=tmp_path / "cache")
    assert vs.ids == ["1.2.3"] and vs[0].shape == SHAPE
    assert calls == [(tmp_path / "dicom", tmp_path / "cache", labels, "normal")]
    assert vs.meta["only"] == "normal" and vs.meta["format"] == "dicom"

    # a source that yields nothing is an error naming the folder, not an empty training set
    monkeypatch.setattr(sources, "volumes_from_dicom", lambda *a, **k: {})
    with pytest.raises(TrainingError, match="no usable volume from the DICOM studies"):
        resolve_data(tmp_path / "dicom")


def test_the_loop_module_still_runs_as_a_program() -> None:
    """``python -m training.train.loop`` (older scripts and docs) is the same command as
    ``python -m training.train`` (which the DDP test below runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "training.train.loop", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--role" in proc.stdout and "torchrun" in proc.stdout


def test_ddp_two_gloo_processes_follow_the_single_process_curve(tmp_path: Path) -> None:
    vs = toy_set(16, seed=5)
    data = tmp_path / "vols"
    write_npz_dir(data, vs)
    single = quick(load_volume_dir(data), tmp_path / "one.pt", steps=10, seed=7)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training.train",  # the package entry point (README, torchrun); training.train.loop works too
        str(data),
        "--role",
        "normal",
        "--preset",
        "test-tiny",
        "--out",
        str(tmp_path / "ddp.pt"),
        "--steps",
        "10",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--no-progress",
        "--log-every",
        "5",
        "--summary",
        str(tmp_path / "ddp.json"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == 10
    np.testing.assert_allclose(ddp["losses"], single.losses, rtol=1e-4)
    # the same model, too (round-off only), written once by rank 0
    assert params_equal(Glow.load(tmp_path / "ddp.pt"), Glow.load(tmp_path / "one.pt")) < 1e-3
    assert Glow.load(tmp_path / "ddp.pt").extra_info["world_size"] == 2
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summaries = [d for d in summaries if "event" not in d and d.get("world_size") == 2]
    assert len(summaries) == 1  # one summary: only rank 0 reports (log lines carry an "event")


def test_sample_writes_volumes_and_montage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Glow(config_from_preset("test-tiny"))
    model.train()
    with torch.no_grad():  # ActNorm init on data, as training would
        model.log_prob(model.preprocess(torch.from_numpy(np.stack(blobs(8)))[:, None], noise=True))
    model.save(tmp_path / "m.pt", extra={"role": "normal"})

    out = tmp_path / "samples"
    assert (
        sample_mod.main(
            [str(tmp_path / "m.pt"), "--n", "2", "--temperature", "0.7", "--out", str(out), "--seed", "3"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == ["sample_000.npz", "sample_001.npz"]
    vols = []
    for name in summary["files"]:
        with np.load(out / name) as z:
            v = z["data"]
        assert v.dtype == np.uint8 and v.shape == SHAPE
        assert v.max() <= 127 and v.std() > 0
        vols.append(v)
    png = (out / "montage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # seeded: the same draw again, a different seed differs
    again, _ = sample_mod.draw(Glow.load(tmp_path / "m.pt"), 2, 0.7, seed=3)
    assert np.array_equal(again[:, 0], np.stack(vols))
    other, _ = sample_mod.draw(Glow.load(tmp_path / "m.pt"), 2, 0.7, seed=4)
    assert not np.array_equal(other[:, 0], np.stack(vols))
    assert sample_mod.main([str(tmp_path / "missing.pt"), "--n", "1", "--out", str(out)]) == 1
