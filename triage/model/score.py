"""Scoring: log p(normal|x) = log p(x|normal) - log p(x) with the current model set.

M0 (trained on normal studies) gives log p(x|normal), M1 (trained on the unlabeled mixture) gives
log p(x); by Bayes their difference is log p(normal|x) up to the constant log prior, which moves every
score equally and so does not change the ranking or the ROC (paper, eq. 3). Low values: probably
abnormal. The likelihood alone is *not* used: it rewards simple images (paper, Appendix A).

Where: when the model set keeps a region calibration, both models' voxel maps are computed instead
(``Glow.log_prob_map``: the same forward pass, its terms kept per location; the global score is the
maps' total) and the most abnormal lesion-sized window of ``map0 - map1`` gives the region score, its
percentile and its centre in patient coordinates (:mod:`triage.model.voxelmap`; a radiograph's: a
point on its image, :mod:`triage.model.radiomap`). ``flag_policy``
says which score flags: global, region, or either at its own calibrated threshold.

Determinism: the flow sees the bin midpoint of each 7-bit voxel (no noise) and models are in eval
mode. A burst is scored several volumes per model call (``batch_size``) where the device gains from it,
a GPU; the CPU runs one volume at a time, its cores already sharing each volume's convolutions
(measured on 2 cores, cpu-small M0 maps: 0.054 s a volume alone, 0.050 in pairs, 0.057 in fours, with
bit-identical results). A score must not depend on which other volumes happened to wait in the same
batch, and no backend promises that: a convolution may pick another kernel, so another summation
order, for another batch size (oneDNN does for the tiny test preset: 3e-7 in a coupling net's first
convolution, 1e-4 nats in a score). So the first batch a scorer runs is checked: each of its volumes
is run again alone, and unless both models' totals and maps agree bit for bit the scorer keeps the
single results and scores one volume a call from then on (logged as ``batch_not_invariant``).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triage.assemble.radiograph import RADIOGRAPH_PREPROCESSING_VERSION
from triage.assemble.volume import PREPROCESSING_VERSION
from triage.model.glow import Glow, fit_to_shape
from triage.model.radiomap import radiograph_fields
from triage.model.registry import ModelSet, Registry, RegistryError, volume_kind
from triage.model.results import ModelSetInfo, ScoreResult
from triage.model.voxelmap import (
    Region,
    RegionScorer,
    grid_index_to_patient,
    load_region_calibration,
    model_index_to_canonical,
    nearest_source_slice,
    search_mask,
)
from triage.ops.logs import get_logger

__all__ = [
    "FLAG_POLICIES",
    "ModelPair",
    "ModelSetInfo",
    "ScoreResult",
    "Scorer",
    "Scorers",
    "ScoringError",
    "VolumeInput",
    "percentile_of",
    "pick_device",
]

log = get_logger("models")

FLAG_POLICIES = ("global", "region", "either")
# What this software's assembly writes, per kind of set: a set calibrated on volumes of another version
# still scores (refusing would stop triage after an upgrade) but says so in every result.
CURRENT_PREPROCESSING = {"ct": PREPROCESSING_VERSION, "cxr": RADIOGRAPH_PREPROCESSING_VERSION}


def preprocessing_warning(info: ModelSetInfo, volume_version: str | None) -> str | None:
    """Why a score may be off its set's calibration: the set's models and operating point were made on
    volumes of another preprocessing version than the one scored (an upgrade changed the assembly; the
    set must be remade on volumes of the new version). None when they agree or either is unknown."""
    if not volume_version or not info.preprocessing_version or volume_version == info.preprocessing_version:
        return None
    return (f"model set {info.version} was trained and calibrated on {info.preprocessing_version} volumes, "
            f"this volume is {volume_version}: its score and percentile are off that calibration until a "
            f"set is made on {volume_version} volumes")


class ScoringError(Exception):
    """The model set cannot be used; scoring stops, receiving goes on, studies wait."""


def pick_device(setting: str) -> torch.device:
    """'auto' takes CUDA when there is a GPU, else the CPU; 'cuda' without a GPU is an error."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ScoringError("scoring.device = 'cuda' but no CUDA device is available")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def percentile_of(score: float, sorted_normals: Sequence[float]) -> float:
    """Share of calibration normals (in %) that scored at or below ``score``: low means unusual."""
    if not sorted_normals:
        return float("nan")
    return 100.0 * bisect.bisect_right(sorted_normals, score) / len(sorted_normals)


@dataclass(frozen=True)
class VolumeInput:
    study_uid: str
    series_uid: str
    volume: np.ndarray  # uint8, canonical shape (32, 128, 128), 7-bit window
    # the assembled volume's metadata (AssembledVolume.metadata(): grid, source geometry, SOP UIDs);
    # without it the region has no patient coordinates or source slice
    metadata: dict[str, Any] | None = None


class ModelPair:
    """M0 and M1 on one device: log p(x|normal) and log p(x) for a canonical volume."""

    def __init__(self, m0: Glow, m1: Glow, device: torch.device):
        if m0.cfg.image_shape != m1.cfg.image_shape:
            raise ScoringError(
                f"M0 and M1 expect different shapes {m0.cfg.image_shape} vs {m1.cfg.image_shape}"
            )
        self.device = device
        self.m0 = m0.to(device).eval()
        self.m1 = m1.to(device).eval()
        if device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    @classmethod
    def load(cls, m0_path: Path, m1_path: Path, device: torch.device) -> ModelPair:
        return cls(Glow.load(m0_path, map_location=device), Glow.load(m1_path, map_location=device), device)

    def _batch(self, volumes: Sequence[np.ndarray]) -> torch.Tensor:
        """Canonical uint8 volumes as one (B, 1, *image_shape) batch on the device."""
        xs = [fit_to_shape(torch.from_numpy(np.ascontiguousarray(v))[None, None], self.m0.cfg.image_shape)
              for v in volumes]  # fmt: skip
        return torch.cat(xs).to(self.device)

    def log_likelihoods(self, volume: np.ndarray) -> tuple[float, float]:
        """(log p(x|normal), log p(x)) in nats for one canonical uint8 volume."""
        return self.log_likelihoods_batch([volume])[0]

    @torch.inference_mode()
    def log_likelihoods_batch(self, volumes: Sequence[np.ndarray]) -> list[tuple[float, float]]:
        """:meth:`log_likelihoods` of several volumes in one model call each."""
        x = self._batch(volumes)
        lp0 = self.m0.log_prob(self.m0.preprocess(x)).double().tolist()
        lp1 = self.m1.log_prob(self.m1.preprocess(x)).double().tolist()
        return list(zip(lp0, lp1, strict=True))

    def log_likelihood_maps(self, volume: np.ndarray) -> tuple[float, float, torch.Tensor]:
        """(log p(x|normal), log p(x), map0 - map1): the voxel maps' totals and their difference per
        level, the maps of log p(normal|x) on the model's grid, (levels, *image_shape) (float64, on the
        scoring device; their sum over levels is the voxel map)."""
        return self.log_likelihood_maps_batch([volume])[0]

    @torch.inference_mode()
    def log_likelihood_maps_batch(self, volumes: Sequence[np.ndarray]
                                  ) -> list[tuple[float, float, torch.Tensor]]:
        """:meth:`log_likelihood_maps` of several volumes in one model call each."""
        x = self._batch(volumes)
        maps0 = self.m0.log_prob_level_maps(self.m0.preprocess(x)).double()
        maps1 = self.m1.log_prob_level_maps(self.m1.preprocess(x)).double()
        return [(float(m0.sum().item()), float(m1.sum().item()), m0 - m1)
                for m0, m1 in zip(maps0, maps1, strict=True)]  # fmt: skip


class Scorer:
    """Both models of one model set, loaded once, on the chosen device."""

    def __init__(self, model_set: ModelSet, device: str = "auto", threads: int = 0,
                 flag_policy: str = "either", batch_size: int = 1, batch_on_cpu: bool = False):
        """``batch_size``: the most volumes in one model call, on a GPU; the CPU scores one at a time
        (module docstring: no gain measured) unless ``batch_on_cpu`` (the same code path, for tests)."""
        if flag_policy not in FLAG_POLICIES:
            raise ScoringError(f"flag_policy must be one of {', '.join(FLAG_POLICIES)}, got {flag_policy!r}")
        self.model_set = model_set
        self.info: ModelSetInfo = model_set.info()
        self.device = pick_device(device)
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            model_set.verify()
            self.pair = ModelPair.load(model_set.m0_path, model_set.m1_path, self.device)
            cal = load_region_calibration(model_set.path, model_set.manifest)
            self.region = RegionScorer(cal, self.device) if cal is not None else None
        except (RegistryError, OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ScoringError(f"model set {model_set.version} cannot be loaded: {exc}") from exc
        except ScoringError as exc:
            raise ScoringError(f"model set {model_set.version}: {exc}") from exc
        self._normals = model_set.calibration_scores
        current = CURRENT_PREPROCESSING.get(self.info.kind)
        if current and self.info.preprocessing_version != current:
            log.warning("model_set_preprocessing_stale", model_version=self.info.version, kind=self.info.kind,
                        set_preprocessing=self.info.preprocessing_version, software_preprocessing=current,
                        action="make a new set on volumes of this version (README, Training)")
        # a set without a region calibration (made before it existed) flags by the global score
        self.flag_policy = flag_policy if self.region is not None else "global"
        self.last_inference_s = 0.0
        self.batch_size = max(1, int(batch_size)) if (self.device.type != "cpu" or batch_on_cpu) else 1
        self._batch_checked = False  # the first batch is checked, each volume against itself alone

    @classmethod
    def from_registry(cls, registry: Registry, device: str = "auto", threads: int = 0,
                      flag_policy: str = "either", batch_size: int = 1, batch_on_cpu: bool = False) -> Scorer:
        try:
            current = registry.current()
        except RegistryError as exc:
            raise ScoringError(str(exc)) from exc
        if current is None:
            raise ScoringError(f"no current model set under {registry.root}: create and promote one")
        return cls(current, device=device, threads=threads, flag_policy=flag_policy, batch_size=batch_size,
                   batch_on_cpu=batch_on_cpu)

    def log_likelihoods(self, volume: np.ndarray) -> tuple[float, float]:
        return self.pair.log_likelihoods(volume)

    @property
    def kind(self) -> str:
        return self.model_set.kind

    def accepts(self, volume: np.ndarray) -> bool:
        """Whether this set scores such an image: a 2-D radiograph needs a chest set, a volume a CT set."""
        return volume_kind(volume) == self.kind

    def info_for(self, version: str) -> ModelSetInfo:
        """The set that scored a result (for its report): this one (a single-set scorer knows no other)."""
        return self.info

    def _likelihoods(self, volumes: list[np.ndarray]) -> list[tuple[float, float, torch.Tensor | None]]:
        """(log p(x|normal), log p(x), level maps of the difference or None) of each volume, at most
        ``batch_size`` a model call; the first batch checked for batch invariance (module docstring)."""
        def run(chunk: list[np.ndarray]) -> list[tuple[float, float, torch.Tensor | None]]:
            if self.region is not None:
                return list(self.pair.log_likelihood_maps_batch(chunk))
            return [(a, b, None) for a, b in self.pair.log_likelihoods_batch(chunk)]

        out: list[tuple[float, float, torch.Tensor | None]] = []
        k = 0
        while k < len(volumes):
            chunk = volumes[k:k + self.batch_size]
            res = run(chunk)
            if len(chunk) > 1 and not self._batch_checked:
                self._batch_checked = True
                alone = [run([v])[0] for v in chunk]
                differ = [abs((a[0] - a[1]) - (b[0] - b[1])) for a, b in zip(alone, res, strict=True)
                          if a[:2] != b[:2] or (a[2] is not None and not torch.equal(a[2], b[2]))]  # type: ignore[arg-type]
                if differ:
                    log.warning("batch_not_invariant", model_version=self.info.version,
                                device=self.device.type, batch=len(chunk), volumes_differing=len(differ),
                                largest_difference_nats=max(differ), action="scoring one volume a call")
                    self.batch_size = 1
                    res = alone
            out.extend(res)
            k += len(chunk)
        return out

    def score(self, items: Sequence[VolumeInput]) -> list[ScoreResult]:
        """Score every waiting volume. Non-finite likelihoods raise: they mean a broken model set."""
        out = []
        t0 = time.perf_counter()
        for it in items:
            if it.volume.dtype != np.uint8:
                raise ScoringError(f"series {it.series_uid}: volume dtype {it.volume.dtype}, expected uint8")
        scored = self._likelihoods([it.volume for it in items])
        for it, (lp0, lp1, dmap) in zip(items, scored, strict=True):
            region: Region | None = None
            if dmap is not None and self.region is not None:
                region = self.region(dmap, search_mask(it.volume, self.pair.m0.cfg.image_shape))
            if not (np.isfinite(lp0) and np.isfinite(lp1)):
                raise ScoringError(
                    f"model set {self.info.version} gave a non-finite likelihood for series {it.series_uid}"
                )
            post = lp0 - lp1
            global_flag = bool(post < self.info.threshold)
            where = self._region_fields(region, global_flag, it.metadata)
            stale = preprocessing_warning(self.info, (it.metadata or {}).get("preprocessing_version"))
            out.append(
                ScoreResult(
                    study_uid=it.study_uid,
                    series_uid=it.series_uid,
                    log_p_normal_model=lp0,
                    log_p_mixture_model=lp1,
                    log_posterior=post,
                    threshold=self.info.threshold,
                    flagged=where.pop("flagged", global_flag),
                    percentile=percentile_of(post, self._normals),
                    model_version=self.info.version,
                    global_flagged=global_flag,
                    flag_policy=self.flag_policy,
                    extra={"zero_fraction": float(np.mean(it.volume == 0)), **where.pop("extra", {})},
                    warnings=[stale] if stale else [],
                    **where,
                )
            )
        self.last_inference_s = (time.perf_counter() - t0) / max(1, len(items))
        return out

    def _region_fields(self, region: Region | None, global_flag: bool, metadata: dict[str, Any] | None
                       ) -> dict[str, Any]:
        """The region's ScoreResult fields, and ``flagged`` by the policy."""
        if region is None or self.region is None:
            return {}
        cal = self.region.cal
        region_flag = bool(region.score < cal.threshold)
        flagged = {"global": global_flag, "region": region_flag, "either": global_flag or region_flag}
        out: dict[str, Any] = {
            "region_score": region.score,
            "region_percentile": percentile_of(region.score, cal.normal_scores),
            "region_threshold": cal.threshold,
            "region_flagged": region_flag,
            "region_window_mm": region.window_mm,
            "flagged": flagged[self.flag_policy],
        }
        if len(self.pair.m0.cfg.image_shape) == 2:  # a radiograph: a point on its image (radiomap)
            return out | radiograph_fields(region.index_zyx[1:], region.window_mm, region.zmap,
                                           self.pair.m0.cfg.image_shape, metadata)
        canon = model_index_to_canonical(region.index_zyx, self.pair.m0.cfg.image_shape)
        if metadata and metadata.get("grid"):
            centre = grid_index_to_patient(metadata["grid"], canon)
            out["region_center_mm"] = centre
            out["region_sop_instance_uid"] = nearest_source_slice(metadata, centre)[0]
        out["region_map"] = {"zmap": region.zmap, "image_shape": list(self.pair.m0.cfg.image_shape),
                             "index_zyx": list(region.index_zyx), "canonical_index_zyx": list(canon),
                             "window_mm": region.window_mm}
        return out


class Scorers:
    """The current set of every kind (head CT, chest radiograph), each study scored by its own kind's.

    Duck-types :class:`Scorer` for the pipeline and ``triage score``: ``accepts`` says whether a study's
    image has a current set of its kind (it waits otherwise), ``score`` sends each image to its kind's
    set, ``info_for`` names the set that scored a result (looked up in the registry when it is no longer
    current), ``last_inference_s``/``device`` describe the last call.
    """

    def __init__(self, by_kind: dict[str, Scorer], registry: Registry | None = None):
        if not by_kind:
            raise ScoringError("no current model set of any kind")
        self.by_kind = dict(by_kind)
        self.registry = registry
        first = next(iter(self.by_kind.values()))
        self.device = first.device
        self.last_inference_s = 0.0

    @classmethod
    def from_registry(cls, registry: Registry, device: str = "auto", threads: int = 0,
                      flag_policy: str = "either") -> Scorers:
        try:
            currents = registry.currents()
        except RegistryError as exc:
            raise ScoringError(str(exc)) from exc
        if not currents:
            raise ScoringError(f"no current model set under {registry.root}: create and promote one")
        return cls({k: Scorer(s, device=device, threads=threads, flag_policy=flag_policy)
                    for k, s in currents.items()}, registry)  # fmt: skip

    @property
    def versions(self) -> dict[str, str]:
        return {k: s.info.version for k, s in self.by_kind.items()}

    @property
    def info(self) -> ModelSetInfo:
        """The head-CT set's info when there is one (what single-kind callers expect), else the first."""
        return (self.by_kind.get("ct") or next(iter(self.by_kind.values()))).info

    def accepts(self, volume: np.ndarray) -> bool:
        return volume_kind(volume) in self.by_kind

    def scorer_for(self, volume: np.ndarray) -> Scorer:
        kind = volume_kind(volume)
        if kind not in self.by_kind:
            raise ScoringError(f"no current {kind} model set (current: {', '.join(self.by_kind)})")
        return self.by_kind[kind]

    @property
    def batch_size(self) -> int:
        """The most studies worth scoring in one call: the largest batch of any kind's scorer."""
        return max(s.batch_size for s in self.by_kind.values())

    def score(self, items: Sequence[VolumeInput]) -> list[ScoreResult]:
        """Each kind's images in one call of its scorer (batched where it batches), results in the
        order of ``items``."""
        t0 = time.perf_counter()
        by_kind: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_kind.setdefault(volume_kind(it.volume), []).append(i)
        results: dict[int, ScoreResult] = {}
        for idx in by_kind.values():
            sc = self.scorer_for(items[idx[0]].volume)
            results.update(zip(idx, sc.score([items[i] for i in idx]), strict=True))
            self.device = sc.device
        self.last_inference_s = (time.perf_counter() - t0) / max(1, len(items))
        return [results[i] for i in range(len(items))]

    def info_for(self, version: str) -> ModelSetInfo:
        for s in self.by_kind.values():
            if s.info.version == version:
                return s.info
        if self.registry is not None:
            try:
                return self.registry.get(version).info()
            except RegistryError:
                pass
        return self.info
