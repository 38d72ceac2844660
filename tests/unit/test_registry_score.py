"""Model sets (create, promote, rollback, Device UID) and scoring (posterior, percentile, determinism)."""

from __future__ import annotations

import json
import math
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


class _CountingPair:
    """Test doubles of what a device does with a batch (there is no GPU here): ``invariant`` results
    identical to one volume a call, computed one by one, or one ulp off whenever a call holds more than
    one volume; every call's batch size recorded."""

    def __init__(self, pair, invariant: bool):
        self.pair, self.invariant, self.calls = pair, invariant, []

    def log_likelihoods_batch(self, volumes):
        self.calls.append(len(volumes))
        out = [self.pair.log_likelihoods_batch([v])[0] for v in volumes]
        return out if self.invariant or len(volumes) == 1 else [(math.nextafter(a, 0.0), b) for a, b in out]

    def __getattr__(self, name):
        return getattr(self.pair, name)


@pytest.mark.parametrize("region", [False, True])
def test_a_burst_scored_in_batches_gives_what_one_at_a_time_gives(tmp_path: Path, region: bool) -> None:
    """Issue 15: several volumes per model call, each result exactly what it is alone, in order (5
    volumes in batches of 3: a full and a partial batch), on this CPU's real kernels: either they are
    batch-invariant for this model or the first batch's check fell back to one a call."""
    reg = Registry(tmp_path / "models")
    if region:
        make_region_set(reg, tmp_path)
    else:
        reg.promote(make_set(reg, tmp_path).version)
    items = [VolumeInput(f"1.2.{i}", f"1.2.{i}.1", canonical(20 + i), metadata()) for i in range(5)]
    one = Scorer.from_registry(reg, device="cpu")
    batched = Scorer.from_registry(reg, device="cpu", batch_size=3, batch_on_cpu=True)
    assert one.batch_size == 1 and batched.batch_size == 3
    assert Scorer.from_registry(reg, device="cpu", batch_size=3).batch_size == 1  # the CPU: one a call
    alone = [one.score([it])[0] for it in items]
    together = batched.score(items)
    assert [r.study_uid for r in together] == [it.study_uid for it in items]
    for a, b in zip(alone, together, strict=True):
        assert (a.log_p_normal_model, a.log_p_mixture_model) == (b.log_p_normal_model, b.log_p_mixture_model)
        assert a.to_json() == b.to_json()
        if region:
            assert a.region_score is not None and np.array_equal(a.region_map["zmap"], b.region_map["zmap"])


@pytest.mark.parametrize("invariant", [True, False])
def test_batches_stay_on_only_where_the_device_gives_the_same_scores(tmp_path: Path, invariant: bool) -> None:
    """Where every volume of the first batch scores alone what it scored in the batch, batches stay on
    (calls of 3 and 2 volumes, the checks of 1); where one differs by an ulp the scorer keeps the single
    results and scores one volume a call from then on, so no score depends on its neighbours."""
    reg = Registry(tmp_path / "models")
    reg.promote(make_set(reg, tmp_path).version)
    items = [VolumeInput(f"1.2.{i}", f"1.2.{i}.1", canonical(40 + i)) for i in range(5)]
    want = [Scorer.from_registry(reg, device="cpu").score([it])[0].log_posterior for it in items]
    scorer = Scorer.from_registry(reg, device="cpu", batch_size=3, batch_on_cpu=True)
    scorer.pair = double = _CountingPair(scorer.pair, invariant)
    assert [r.log_posterior for r in scorer.score(items)] == want
    if invariant:
        assert scorer.batch_size == 3 and double.calls == [3, 1, 1, 1, 2]
    else:
        assert scorer.batch_size == 1 and double.calls == [3, 1, 1, 1, 1, 1]
    double.calls.clear()
    assert [r.log_posterior for r in scorer.score(items[:2])] == want[:2]
    assert double.calls == ([2] if invariant else [1, 1])


def test_a_volume_of_another_preprocessing_version_is_scored_with_a_warning(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    s = make_set(reg, tmp_path)  # made on "test" volumes
    reg.promote(s.version)
    scorer = Scorer.from_registry(reg, device="cpu")
    same, other, unknown = scorer.score([
        VolumeInput("1.2.3", "1.2.3.1", canonical(0), {"preprocessing_version": "test"}),
        VolumeInput("1.2.4", "1.2.4.1", canonical(0), {"preprocessing_version": "assemble-99"}),
        VolumeInput("1.2.5", "1.2.5.1", canonical(0))])
    assert same.warnings == [] and unknown.warnings == []
    assert len(other.warnings) == 1
    assert f"model set {s.version} was trained and calibrated on test volumes" in other.warnings[0]
    assert "this volume is assemble-99" in other.warnings[0]
    assert other.to_json()["warnings"] == other.warnings
    assert other.log_posterior == same.log_posterior  # a warning, not another score


def test_a_non_finite_region_threshold_is_null_in_the_json() -> None:
    # the global operating point flagged every calibration normal: the region threshold is +inf
    from triage.model.results import ScoreResult

    r = ScoreResult("1.2.3", "1.2.3.1", -1.0, 0.0, -1.0, 0.0, True, 0.0, "v", region_score=-2.5,
                    region_threshold=math.inf, region_flagged=True)
    out = r.to_json()
    assert out["region_threshold"] is None and out["region_score"] == -2.5
    json.dumps(out, allow_nan=False)  # strict JSON, as SQLite's json functions read it


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


# -- the region score --------------------------------------------------------------------------------


def make_region_set(reg: Registry, tmp: Path, n_normals: int = 6):
    """A set whose region calibration comes from ``n_normals`` random canonical volumes, as
    ``models create`` computes it (region_calibration on the calibration normals)."""
    from triage.model.modelset import region_calibration
    from triage.model.score import ModelPair

    m0, m1 = tiny_model(tmp / "m0.pt", 1), tiny_model(tmp / "m1.pt", 2)
    pair = ModelPair(Glow.load(m0), Glow.load(m1), torch.device("cpu"))
    vols = [canonical(100 + i) for i in range(n_normals)]
    normals = [float(np.subtract(*pair.log_likelihoods(v))) for v in vols]
    threshold = float(np.sort(normals)[1])  # leaves 5 of 6 normals unflagged
    region = region_calibration(pair, vols, threshold, normals, reg.root)
    assert region is not None and region["specificity"] == pytest.approx(5 / 6)
    s = reg.create(m0, m1, preset="test-tiny", preprocessing_version="test", threshold=threshold,
                   method="specificity=0.8", normal_scores=normals, provenance={}, software_version="0.1.0",
                   calibration_extra={"region": region})
    reg.promote(s.version)
    return s


def metadata(n_slices: int = 30) -> dict:
    """What an assembled volume's metadata says about its geometry: the canonical grid (x left, y
    posterior, z index going inferior) and the source slices, 5 mm apart, with their SOP UIDs."""
    positions = [[-100.0, -120.0, 40.0 - 5.0 * k] for k in range(n_slices)]
    return {
        "grid": {"origin": [-109.14, -129.14, 50.0], "spacing": [1.71875, 1.71875, 4.5],
                 "direction": [1, 0, 0, 0, 1, 0, 0, 0, -1]},
        "sop_instance_uids": [f"1.2.3.{k}" for k in range(n_slices)],
        "source_geometry": {"normal": [0.0, 0.0, 1.0], "slice_positions_mm": positions},
    }


@pytest.mark.parametrize("policy", ["global", "region", "either"])
def test_region_fields_are_in_the_json_and_consistent(tmp_path: Path, policy: str) -> None:
    reg = Registry(tmp_path / "models")
    s = make_region_set(reg, tmp_path)
    scorer = Scorer.from_registry(reg, device="cpu", flag_policy=policy)
    plain = Scorer.from_registry(reg, device="cpu")
    meta = metadata()
    for i in range(3):
        r = scorer.score([VolumeInput("1.2", "1.2.3", canonical(i), meta)])[0]
        out = r.to_json()
        json.dumps(out)
        for key in ("region_score", "region_percentile", "region_center_mm", "region_sop_instance_uid",
                    "region_threshold", "region_flagged", "global_flagged", "flag_policy"):
            assert key in out
        assert "region_map" not in out
        assert out["flag_policy"] == policy
        assert r.region_flagged == (r.region_score < r.region_threshold)
        assert r.global_flagged == (r.log_posterior < r.threshold)
        want = {"global": r.global_flagged, "region": r.region_flagged,
                "either": r.global_flagged or r.region_flagged}[policy]
        assert r.flagged == want
        cal_scores = s.manifest["calibration"]["region"]["normal_scores"]
        assert r.region_percentile == percentile_of(r.region_score, cal_scores)
        assert r.region_window_mm in (10.0, 20.0, 40.0)
        # the centre lies in the grid's box, and the source slice named is the nearest one in z
        x, y, z = r.region_center_mm
        assert -110 <= x <= -109.14 + 128 * 1.71875 and -130 <= y <= -129.14 + 128 * 1.71875
        assert 50.0 - 31 * 4.5 <= z <= 50.0
        k = meta["sop_instance_uids"].index(r.region_sop_instance_uid)
        assert abs(meta["source_geometry"]["slice_positions_mm"][k][2] - z) <= 2.5
        # the global score by the maps' path equals the plain log_prob path
        m0 = Glow.load(s.m0_path).eval()
        x_in = fit_to_shape(torch.from_numpy(canonical(i))[None, None], m0.cfg.image_shape)
        with torch.no_grad():
            lp0 = m0.log_prob(m0.preprocess(x_in)).item()
        assert r.log_p_normal_model == pytest.approx(lp0, rel=1e-5)
        assert plain.score([VolumeInput("1.2", "1.2.3", canonical(i))])[0].region_center_mm is None


def test_a_set_without_region_calibration_flags_by_the_global_score(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.promote(make_set(reg, tmp_path).version)
    r = Scorer.from_registry(reg, device="cpu", flag_policy="region").score(
        [VolumeInput("s", "se", canonical(3), metadata())])[0]
    assert r.flag_policy == "global" and r.region_score is None and r.flagged == (r.log_posterior < 0.0)
    with pytest.raises(ScoringError, match="flag_policy"):
        Scorer.from_registry(reg, device="cpu", flag_policy="sometimes")


def test_a_changed_region_calibration_file_is_refused(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    s = make_region_set(reg, tmp_path)
    path = reg.root / s.manifest["calibration"]["region"]["file"]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ScoringError, match="does not match its manifest hash"):
        Scorer.from_registry(reg, device="cpu")


def test_the_score_stage_records_the_region_and_keeps_its_map(tmp_path: Path) -> None:
    """pipeline.score_assembled: the volume's metadata reaches the scorer (centre in patient mm, nearest
    source slice), the stored score has the region fields, and a flagged study's z-map is kept for the
    key images."""
    import pydicom

    from training.harness.series import write_ct_series
    from triage.assemble.volume import AssembledVolume, save_volume
    from triage.pipeline import _load_region_map, score_assembled
    from triage.store.db import Store

    reg = Registry(tmp_path / "models")
    make_region_set(reg, tmp_path)
    scorer = Scorer.from_registry(reg, device="cpu")
    store = Store(tmp_path / "var")
    meta = metadata()
    (ct,) = write_ct_series(tmp_path / "ct", n=1, size=16, study_uid="1.2.9", series_uid="1.2.9.1")
    ds = pydicom.dcmread(ct, stop_before_pixels=True)
    store.put_instance(str(ds.SOPInstanceUID), "1.2.9", "1.2.9.1", str(ds.SOPClassUID),
                       str(ds.file_meta.TransferSyntaxUID), lambda f: f.write(ct.read_bytes()), "TEST",
                       modality="CT")
    store.set_series_state("1.2.9.1", "stable")
    store.set_study_state("1.2.9", "stable")
    vol = AssembledVolume(data=canonical(9), hu_stats={}, source_geometry=meta["source_geometry"],
                          grid=meta["grid"], coverage_mm=144.0, warnings=[], zero_fraction=0.0,
                          study_uid="1.2.9", series_uid="1.2.9.1",
                          sop_instance_uids=meta["sop_instance_uids"])
    path = save_volume(vol, tmp_path / "v.npz")
    store.record_assembly("1.2.9", "1.2.9.1", 0, path, complete_at=0.0)
    assert scorer.region is not None
    scorer.region.cal.threshold = float("inf")  # flag it by the region: flagged studies keep their map
    assert score_assembled(store, scorer) == 1
    s = store.score("1.2.9")
    assert s is not None and s["flagged"] and s["region_flagged"]
    assert s is not None and s["region_score"] is not None and len(s["region_center_mm"]) == 3
    assert s["region_sop_instance_uid"] in meta["sop_instance_uids"]
    loaded = _load_region_map(store.results_dir("1.2.9") / "region-0.npz")
    assert loaded is not None
    region_map, grid = loaded
    assert region_map["zmap"].shape == tuple(scorer.pair.m0.cfg.image_shape) and grid == meta["grid"]
    store.close()
