"""Model sets (create, promote, rollback, Device UID) and scoring (posterior, percentile, determinism)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from training.presets import glow_from_preset
from triage.model.glow import Glow, fit_to_shape
from triage.model.registry import Registry, RegistryError
from triage.model.score import Scorer, ScoringError, VolumeInput, percentile_of, pick_device


def tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    m = glow_from_preset("test-tiny")
    x = torch.randint(0, 128, (4, 1, *m.cfg.image_shape))
    m.train()
    m.bits_per_dim(x, noise=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save(path, extra={"role": "normal" if seed % 2 else "mixture"})
    return path


def make_set(reg: Registry, tmp: Path, seeds=(1, 2), threshold: float = 0.0, normals=(-3.0, -1.0, 1.0, 2.0)):
    m0 = tiny_model(tmp / f"m0-{seeds[0]}.pt", seeds[0])
    m1 = tiny_model(tmp / f"m1-{seeds[1]}.pt", seeds[1])
    return reg.create(
        m0, m1, preset="test-tiny", preprocessing_version="test", threshold=threshold,
        method="youden", normal_scores=list(normals), provenance={"test": True}, software_version="0.1.0",
    )


def canonical(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 128, size=(32, 128, 128), dtype=np.uint8)


def test_create_promote_rollback_and_history(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    assert reg.current() is None and reg.list() == []
    a = make_set(reg, tmp_path, (1, 2))
    b = make_set(reg, tmp_path, (3, 4))
    assert reg.current() is None  # creating does not promote
    reg.promote(a.version)
    assert reg.current().version == a.version
    reg.promote(b.version, reason="nightly")
    assert reg.current().version == b.version
    assert (tmp_path / "models" / "current").is_symlink()
    back = reg.rollback()
    assert back.version == a.version and reg.current().version == a.version
    hist = reg.history()
    assert [h["version"] for h in hist] == [a.version, b.version, a.version]
    assert hist[1]["previous"] == a.version and hist[1]["reason"] == "nightly"
    assert {s.version for s in reg.list()} == {a.version, b.version}
    with pytest.raises(RegistryError, match="no model set"):
        reg.promote("nope")


def test_device_uid_changes_with_either_model_and_is_stable(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    a = make_set(reg, tmp_path, (1, 2))
    same = make_set(reg, tmp_path, (1, 2))
    other_m1 = make_set(reg, tmp_path, (1, 4))
    other_m0 = make_set(reg, tmp_path, (3, 2))
    uids = [s.manifest["device_uid"] for s in (a, same, other_m1, other_m0)]
    assert uids[0] == uids[1]
    assert len(set(uids)) == 3
    assert all(u.startswith("1.2.") and len(u) <= 64 for u in uids)


def test_promote_refuses_a_tampered_set(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    a = make_set(reg, tmp_path)
    with (a.path / "m1.pt").open("ab") as f:
        f.write(b"x")
    with pytest.raises(RegistryError, match="does not match its manifest"):
        reg.promote(a.version)
    assert reg.current() is None


def test_concurrent_readers_never_see_a_missing_current(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    a, b = make_set(reg, tmp_path, (1, 2)), make_set(reg, tmp_path, (3, 4))
    reg.promote(a.version)
    seen: set[str] = set()
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            cur = reg.current()
            if cur is None:
                errors.append("current vanished")
            else:
                seen.add(cur.version)

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(50):
        reg.promote(b.version)
        reg.promote(a.version)
    stop.set()
    t.join()
    assert not errors
    assert seen <= {a.version, b.version}


def test_score_is_m0_minus_m1_with_flag_and_percentile(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    s = make_set(reg, tmp_path, threshold=0.0, normals=(-3.0, -1.0, 1.0, 2.0))
    reg.promote(s.version)
    scorer = Scorer.from_registry(reg, device="cpu")
    vols = [VolumeInput("1.2.3", "1.2.3.4", canonical(i)) for i in range(3)]
    results = scorer.score(vols)
    m0, m1 = Glow.load(s.m0_path).eval(), Glow.load(s.m1_path).eval()
    for v, r in zip(vols, results, strict=True):
        x = fit_to_shape(torch.from_numpy(v.volume)[None, None], m0.cfg.image_shape)
        with torch.no_grad():
            lp0 = m0.log_prob(m0.preprocess(x)).item()
            lp1 = m1.log_prob(m1.preprocess(x)).item()
        assert r.log_p_normal_model == pytest.approx(lp0, abs=1e-3)
        assert r.log_p_mixture_model == pytest.approx(lp1, abs=1e-3)
        assert r.log_posterior == r.log_p_normal_model - r.log_p_mixture_model
        assert r.flagged == (r.log_posterior < 0.0)
        assert r.percentile == percentile_of(r.log_posterior, [-3.0, -1.0, 1.0, 2.0])
        assert r.model_version == s.version
        out = r.to_json()
        for key in ("study_uid", "series_uid", "log_p_normal_model", "log_p_mixture_model",
                    "log_posterior", "threshold", "flagged", "model_version"):
            assert key in out
        json.dumps(out)


def test_scores_are_bit_identical_alone_or_among_others(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.promote(make_set(reg, tmp_path).version)
    scorer = Scorer.from_registry(reg, device="cpu")
    v = VolumeInput("s", "se", canonical(7))
    alone = scorer.score([v])[0]
    among = scorer.score([VolumeInput("a", "b", canonical(1)), v, VolumeInput("c", "d", canonical(2))])[1]
    again = Scorer.from_registry(reg, device="cpu").score([v])[0]
    assert alone.log_posterior == among.log_posterior == again.log_posterior


def test_percentile() -> None:
    normals = [-5.0, -2.0, 0.0, 3.0]
    assert percentile_of(-10.0, normals) == 0.0
    assert percentile_of(0.0, normals) == 75.0
    assert percentile_of(10.0, normals) == 100.0
    assert np.isnan(percentile_of(1.0, []))


def test_unloadable_model_set_gives_a_clear_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    with pytest.raises(ScoringError, match="no current model set"):
        Scorer.from_registry(reg)
    s = make_set(reg, tmp_path)
    reg.promote(s.version)
    os.chmod(s.path / "m0.pt", 0o644)
    (s.path / "m0.pt").write_bytes(b"garbage")
    with pytest.raises(ScoringError, match=f"model set {s.version} cannot be loaded"):
        Scorer.from_registry(reg, device="cpu")


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ScoringError, match="no CUDA device"):
            pick_device("cuda")
