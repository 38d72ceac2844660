"""The stages after receive, each a function of the store: assemble -> score -> report -> send.

Every stage reads its input from the store and writes its output back in one state transition, so
the daemon can be killed between any two lines and resume: a stage only picks up studies in its input
state, and its outputs (volume, score, SR file, outbox rows) are written before the state moves on.
Deterministic UIDs (a function of the study, series, assembly generation and model version) make a
redone report byte-identical to the first, so a PACS sees a duplicate, never a second report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from triage.assemble.headers import read_header_dataset
from triage.assemble.radiograph import assemble_by_kind, load_assembled
from triage.assemble.volume import VolumeError, save_volume
from triage.config import Config
from triage.model.registry import UID_PREFIX, volume_kind
from triage.model.results import ModelSetInfo, ScoreResult
from triage.model.score import Scorer, Scorers, VolumeInput
from triage.ops.logs import get_logger
from triage.ops.metrics import METRICS
from triage.report.hl7 import build_oru
from triage.report.keyimages import build_key_images, choose_slices
from triage.report.routes import Payload, plan_routes
from triage.report.sr import build_sr
from triage.send.base import (
    Delivery,
    Destination,
    SendError,
    backoff_delay,
    destination_class,
    make_destination,
)
from triage.store.db import Store

log = get_logger("pipeline")


def _uid(*parts: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage", *parts])


# ------------------------------------------------------------------------------------------ headers


class HeaderCache:
    """The pixel-free datasets the assembler parsed, kept for the same study's report stage.

    The report needs every instance header of the scored series (the SR's evidence, its patient and
    study modules, the planes key images are chosen by); the assembler has just parsed exactly those
    files, so the report takes them from here instead of parsing each file again (about 0.3 ms a slice:
    40 ms of a 125-slice study). A dataset is used only while its file is the one it was read from
    (same inode, size and mtime; a re-sent instance is a new file), so what the report sees is what
    reading the file would give. Bounded (``max_series``, oldest dropped): a miss just reads the file.
    Thread-safe enough for one assembler and one reporter (dict operations under the GIL).
    """

    def __init__(self, max_series: int = 16):
        self.max_series = max_series
        self._series: dict[str, dict[str, tuple[tuple[int, int, int], Dataset]]] = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def put(self, series_uid: str, path: Path, ds: Dataset) -> None:
        stamp = self._stamp(Path(path))
        if stamp is None:
            return
        entry = self._series.pop(series_uid, None) or {}
        entry[str(path)] = (stamp, ds)
        self._series[series_uid] = entry  # most recent last
        while len(self._series) > self.max_series:
            self._series.pop(next(iter(self._series)))

    def headers(self, series_uid: str, paths: list[Path]) -> list[Dataset]:
        """The datasets of ``paths`` (a series' files), parsed only where not kept; the series' entry
        is dropped afterwards (a report is built once per assembly)."""
        kept = self._series.pop(series_uid, {})
        out = []
        for p in paths:
            hit = kept.get(str(p))
            out.append(hit[1] if hit is not None and hit[0] == self._stamp(Path(p))
                       else dcmread(p, stop_before_pixels=True))
        return out


# ------------------------------------------------------------------------------------------ assemble


def assemble_due(store: Store, cfg: Config, now: float | None = None, headers: HeaderCache | None = None,
                 on_study: Callable[[], None] | None = None) -> int:
    """Assemble every study whose series are all quiet (or forced); returns studies handled.

    ``on_study`` is called after each study (the daemon wakes the scorer with it): a burst makes many
    studies due in one step, and a scorer woken only when the whole step ends sat idle while the first
    of them waited (the e2e bench's burst account, 2026-12-01: one study 1.9 s idle, 4 studies
    assembled meanwhile)."""
    rules = cfg.settings.assembly
    now = store.clock() if now is None else now
    due = store.series_due(now, rules.quiet_seconds, rules.force_seconds)
    by_study: dict[str, list[str]] = defaultdict(list)
    for s in due:
        by_study[s.study_uid].append(s.series_uid)
    handled = 0
    for study_uid, due_uids in by_study.items():
        all_series = store.study_series(study_uid)
        waiting = [s for s in all_series if s.state == "receiving" and s.series_uid not in due_uids]
        if waiting:
            continue  # another series of the study is still arriving: select among all of them later
        _assemble_study(store, cfg, study_uid, all_series, headers)
        handled += 1
        if on_study is not None:
            on_study()
    return handled


def _assemble_study(store: Store, cfg: Config, study_uid: str, all_series: list,
                    cache: HeaderCache | None = None) -> None:
    rules = cfg.settings.assembly
    generations = {s.series_uid: s.assembly_generation for s in all_series}
    complete_at = store.clock()
    claimed = [s.series_uid for s in all_series if s.state == "receiving"]
    for uid in claimed:
        store.set_series_state(uid, "stable", expected_state="receiving")
    store.set_study_state(study_uid, "stable")
    headers: dict[str, list] = {}
    for s in all_series:
        hs = []
        for inst in store.series_instances(s.series_uid):
            try:
                h, ds = read_header_dataset(inst.path)
            except VolumeError as exc:
                log.warning("header_unreadable", study_uid=study_uid, series_uid=s.series_uid,
                            sop_instance_uid=inst.sop_uid, reason=str(exc))
                continue
            hs.append(h)
            if cache is not None:
                cache.put(s.series_uid, inst.path, ds)
        headers[s.series_uid] = hs
    sel, vol = assemble_by_kind(headers, rules)  # head CT or chest radiograph, by the study's images
    for uid, why in sel.skipped.items():
        METRICS.series_skipped(sel.categories.get(uid, "other"))
        store.set_series_state(uid, "skipped", reason=why, expected_generation=generations[uid])
    if vol is None or sel.chosen is None:
        store.set_study_state(study_uid, "rejected", reason=sel.reason)
        log.info("study_rejected", study_uid=study_uid, reason=sel.reason)
        return
    uid = sel.chosen
    gen = generations[uid]
    out = store.volume_path(study_uid, uid, gen)
    save_volume(vol, out)
    if not store.set_series_state(uid, "assembled", expected_generation=gen):
        return  # re-opened meanwhile: a newer assembly will follow
    # the selection's warnings (main orientation group, view chosen by content) and the volume's, once
    # each: what `triage score` reports for the same study, and what the SR carries
    warnings = list(dict.fromkeys([*sel.warnings, *vol.warnings]))
    store.record_assembly(study_uid, uid, gen, out, complete_at=complete_at, warnings=warnings)
    METRICS.series_assembled()
    log.info("study_assembled", study_uid=study_uid, series_uid=uid, generation=gen,
             coverage_mm=round(vol.coverage_mm, 1), warnings=warnings)


# ------------------------------------------------------------------------------------------ score


def score_assembled(store: Store, scorer: Scorer | Scorers, limit: int = 16) -> int:
    """Score every assembled study (all waiting ones in one call, models kept resident)."""
    items = []
    # a study whose kind (head CT, chest radiograph) has no current set waits in 'assembled': look
    # further than ``limit`` so that such studies cannot hold back the ones that can be scored
    for study in store.studies_in_state("assembled", limit=limit * 8):
        if len(items) >= limit:
            break
        asm = store.assembly(study.study_uid)
        if asm is None:
            store.set_study_state(study.study_uid, "failed", reason="assembled without a recorded volume")
            continue
        try:
            vol = load_assembled(asm.volume_path)
        except VolumeError as exc:
            store.set_study_state(study.study_uid, "failed", reason=str(exc))
            continue
        if not scorer.accepts(vol.data):
            continue
        items.append((asm, VolumeInput(study.study_uid, asm.series_uid, vol.data, vol.metadata())))
    if not items:
        return 0
    results = scorer.score([v for _, v in items])
    for (asm, item), res in zip(items, results, strict=True):
        if res.region_map is not None and res.flagged:  # for the key images of the report stage
            _save_region_map(store, res, asm.generation, item.metadata)
        warnings = list(dict.fromkeys([*asm.warnings, *res.warnings]))  # assembly's, then the scorer's
        # inference_s: this call's model time a volume (both flows, maps, region), for the record and the
        # e2e bench's account of a burst (bench/e2e_bench.py: scorer busy time = inference + overhead)
        store.record_score(res.study_uid, asm.generation, {**res.to_json(), "warnings": warnings,
                                                          "inference_s": round(scorer.last_inference_s, 4)})
        METRICS.study_scored(res.log_posterior, res.flagged, scorer.last_inference_s, scorer.device.type,
                             kind=volume_kind(item.volume))
        log.info("study_scored", study_uid=res.study_uid, series_uid=res.series_uid,
                 log_posterior=round(res.log_posterior, 3), flagged=res.flagged, percentile=res.percentile,
                 model_version=res.model_version)
    return len(results)


def _save_region_map(store: Store, res: ScoreResult, generation: int, metadata: dict | None) -> None:
    """The region's z-map (model grid) and the canonical grid, beside the study's results."""
    grid = (metadata or {}).get("grid") or {}
    meta = json.dumps({k: v for k, v in res.region_map.items() if k != "zmap"} | {"grid": grid})
    path = store.results_dir(res.study_uid) / f"region-{generation}.npz"
    store.write_result_file(path, lambda f: np.savez_compressed(
        f, zmap=np.asarray(res.region_map["zmap"], dtype=np.float32), meta=np.array(meta)))


def _load_region_map(path: Path) -> tuple[dict, dict] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        return {"zmap": z["zmap"], **meta}, meta.get("grid") or {}


# ------------------------------------------------------------------------------------------ report


@dataclass
class _Report:
    """One scored study's inputs to its payloads; each payload file is written once and reused."""

    store: Store
    cfg: Config
    result: ScoreResult
    info: ModelSetInfo
    paths: list[Path]  # the scored series' instance files, in the store's order
    source: list[Dataset]
    generation: int
    key: tuple[str, ...]  # study, series, generation, model version: the seed of every UID
    scored_at: float

    @property
    def folder(self) -> Path:
        return self.store.results_dir(self.result.study_uid)

    def sr(self) -> list[Path]:
        """The SR, and for a flagged study with a located region its key images (written first, so an
        SR on disk means its key images are too; the SR references them)."""
        path = self.folder / f"sr-{self.generation}.dcm"
        if not path.exists():
            for old in self.folder.glob(f"key-{self.generation}-*.dcm"):
                old.unlink()  # left by a crash before the SR: rebuilt identically below
            kis = self._key_images()
            for i, ki in enumerate(kis, start=1):
                self.store.write_result_file(self.folder / f"key-{self.generation}-{i}.dcm",
                                             lambda f, ki=ki: ki.save_as(f, enforce_file_format=True))
            sr = build_sr(self.result, self.source, self.info,
                          series_instance_uid=_uid("sr-series", *self.key),
                          sop_instance_uid=_uid("sr", *self.key),
                          content_datetime=datetime.fromtimestamp(self.scored_at, UTC), key_images=kis)
            self.store.write_result_file(path, lambda f: sr.save_as(f, enforce_file_format=True))
        keys = sorted(self.folder.glob(f"key-{self.generation}-*.dcm"),
                      key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        return [path, *keys]

    def _key_images(self) -> list[Dataset]:
        """Key images of a flagged study's region (triage.report.keyimages); none otherwise."""
        r = self.result
        loaded = _load_region_map(self.folder / f"region-{self.generation}.npz")
        if not r.flagged or r.region_center_mm is None or loaded is None:
            return []
        region_map, grid = loaded
        picked = {str(ds.SOPInstanceUID) for ds in
                  choose_slices(self.source, r.region_center_mm, float(r.region_window_mm or 0.0))}
        full = [dcmread(p) for p, ds in zip(self.paths, self.source, strict=True)
                if str(ds.SOPInstanceUID) in picked]
        return build_key_images(r, full, region_map, grid, self.info,
                                series_instance_uid=_uid("key-series", *self.key),
                                sop_instance_uid=lambda i: _uid("key", str(i), *self.key),
                                content_datetime=datetime.fromtimestamp(self.scored_at, UTC))

    def source_series(self) -> list[Path]:
        return list(self.paths)

    def oru(self) -> list[Path]:
        path = self.folder / f"oru-{self.generation}.hl7"
        if not path.exists():
            msg = build_oru(self.result, self.source[0], self.info, self.cfg.settings.hl7,
                            control_id=_uid("hl7", *self.key)[-20:],
                            when=datetime.fromtimestamp(self.scored_at, UTC))
            self.store.write_result_file(path, lambda f: f.write(msg.encode("utf-8")))
        return [path]

    def files(self, payload: Payload) -> list[Path]:
        """The payload files of a route (what is sent; the destination kind decides how)."""
        build: dict[str, Callable[[], list[Path]]] = {
            "sr": self.sr, "source": self.source_series, "oru": self.oru,
        }
        return build[payload]()


def report_scored(store: Store, scorer: Scorer | Scorers, cfg: Config, limit: int = 16,
                  headers: HeaderCache | None = None) -> int:
    """Build SR and HL7 payloads for scored studies and put them in the outbox, then -> reported.

    Each planned route becomes one outbox row (kind, destination name, payload files, target); the
    kind is only checked against the registry here (an unknown one, or one that cannot carry the
    payload, is a bug: the config admits neither), never dispatched on.
    """
    s = cfg.settings
    cache = headers if headers is not None else HeaderCache(0)
    n = 0
    for study in store.studies_in_state("scored", limit=limit):
        asm = store.assembly(study.study_uid)
        score = store.score(study.study_uid)
        if asm is None or score is None:
            store.set_study_state(study.study_uid, "failed", reason="scored without a recorded score")
            continue
        result = ScoreResult(**{k: score[k] for k in ScoreResult.__dataclass_fields__ if k in score})
        paths = [i.path for i in store.series_instances(asm.series_uid)]
        report = _Report(
            store, cfg, result, scorer.info_for(result.model_version), paths,
            cache.headers(asm.series_uid, paths), asm.generation,
            (study.study_uid, asm.series_uid, str(asm.generation), result.model_version),
            score["scored_at"],
        )
        items: list[tuple[str, str, list[Path], str]] = []
        for route in plan_routes(result, s.routing, s.pacs, s.hl7):
            carries = destination_class(route.kind).payloads
            if route.payload not in carries:
                raise SendError(f"{route.destination}: destination kind {route.kind!r} cannot carry "
                                f"{route.payload!r} (only {', '.join(sorted(carries))})")
            items.append((route.kind, route.destination, report.files(route.payload), route.target))
        store.enqueue_results(study.study_uid, asm.generation, items)
        n += 1
    return n


# ------------------------------------------------------------------------------------------ send


@dataclass
class Sender:
    """Drains the outbox: one destination object per target, retries scheduled in the store."""

    store: Store
    cfg: Config

    def destination(self, kind: str, name: str, target: str) -> Destination:
        """The registered destination kind's object for one outbox row (built per attempt, so a
        changed timeout or credential applies to rows already waiting)."""
        return make_destination(kind, name, target, self.cfg)

    def drain(self, now: float | None = None, limit: int = 32) -> int:
        o = self.cfg.settings.outbox
        now = self.store.clock() if now is None else now
        done = 0
        for row in self.store.outbox_due(now, limit=limit):
            try:
                dest = self.destination(row.kind, row.destination, row.target)
                ack = dest.send(Delivery(row.id, row.kind, row.destination, row.files))
            except (SendError, OSError, ValueError, RuntimeError) as exc:
                attempts = row.attempts + 1
                if attempts >= o.max_attempts:
                    self.store.outbox_dead(row.id, str(exc))
                    METRICS.outbox_dead_letter(row.destination)
                    log.error("outbox_dead_letter", study_uid=row.study_uid, destination=row.destination,
                              attempts=attempts, reason=str(exc))
                else:
                    delay = backoff_delay(attempts, o.backoff_initial_s, o.backoff_max_s)
                    self.store.outbox_retry(row.id, str(exc), now + delay)
                    METRICS.outbox_retry(row.destination)
                    log.warning("outbox_retry", study_uid=row.study_uid, destination=row.destination,
                                attempts=attempts, retry_in_s=round(delay, 1), reason=str(exc))
                continue
            finished = self.store.outbox_sent(row.id, ack)
            done += 1
            log.info("outbox_sent", study_uid=row.study_uid, destination=row.destination, ack=ack)
            if finished is not None:
                METRICS.result_acknowledged(max(0.0, self.store.clock() - finished))
        return done


