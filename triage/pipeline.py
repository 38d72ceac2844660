"""The stages after receive, each a function of the store: assemble -> score -> report -> send.

Every stage reads its input from the store and writes its output back in one state transition, so
the daemon can be killed between any two lines and resume: a stage only picks up studies in its input
state, and its outputs (volume, score, SR file, outbox rows) are written before the state moves on.
Deterministic UIDs (a function of the study, series, assembly generation and model version) make a
redone report byte-identical to the first, so a PACS sees a duplicate, never a second report.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from triage.assemble.volume import VolumeError, assemble_study, load_volume, read_header, save_volume
from triage.config import Config
from triage.model.registry import UID_PREFIX
from triage.model.results import ScoreResult
from triage.model.score import Scorer, VolumeInput
from triage.ops.logs import get_logger
from triage.ops.metrics import METRICS
from triage.report.hl7 import build_oru
from triage.report.routes import plan_routes
from triage.report.sr import build_sr
from triage.send.base import (
    Delivery,
    Destination,
    DicomStoreDestination,
    MLLPDestination,
    SendError,
    backoff_delay,
)
from triage.store.db import Store

log = get_logger("pipeline")


def _uid(*parts: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage", *parts])


# ------------------------------------------------------------------------------------------ assemble


def assemble_due(store: Store, cfg: Config, now: float | None = None) -> int:
    """Assemble every study whose series are all quiet (or forced); returns studies handled."""
    rules = cfg.settings.assembly
    now = time.time() if now is None else now
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
        _assemble_study(store, cfg, study_uid, all_series)
        handled += 1
    return handled


def _assemble_study(store: Store, cfg: Config, study_uid: str, all_series: list) -> None:
    rules = cfg.settings.assembly
    generations = {s.series_uid: s.assembly_generation for s in all_series}
    complete_at = time.time()
    claimed = [s.series_uid for s in all_series if s.state == "receiving"]
    for uid in claimed:
        store.set_series_state(uid, "stable", expected_state="receiving")
    store.set_study_state(study_uid, "stable")
    headers: dict[str, list] = {}
    for s in all_series:
        hs = []
        for inst in store.series_instances(s.series_uid):
            try:
                hs.append(read_header(inst.path))
            except VolumeError as exc:
                log.warning("header_unreadable", study_uid=study_uid, series_uid=s.series_uid,
                            sop_instance_uid=inst.sop_uid, reason=str(exc))
        headers[s.series_uid] = hs
    sel, vol = assemble_study(headers, rules)
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
    store.record_assembly(study_uid, uid, gen, out, complete_at=complete_at, warnings=vol.warnings)
    METRICS.series_assembled()
    log.info("study_assembled", study_uid=study_uid, series_uid=uid, generation=gen,
             coverage_mm=round(vol.coverage_mm, 1), warnings=[*sel.warnings, *vol.warnings])


# ------------------------------------------------------------------------------------------ score


def score_assembled(store: Store, scorer: Scorer, limit: int = 16) -> int:
    """Score every assembled study (all waiting ones in one call, models kept resident)."""
    items = []
    for study in store.studies_in_state("assembled", limit=limit):
        asm = store.assembly(study.study_uid)
        if asm is None:
            store.set_study_state(study.study_uid, "failed", reason="assembled without a recorded volume")
            continue
        try:
            vol = load_volume(asm.volume_path)
        except VolumeError as exc:
            store.set_study_state(study.study_uid, "failed", reason=str(exc))
            continue
        items.append((asm, VolumeInput(study.study_uid, asm.series_uid, vol.data)))
    if not items:
        return 0
    results = scorer.score([v for _, v in items])
    for (asm, _), res in zip(items, results, strict=True):
        store.record_score(res.study_uid, asm.generation, res.to_json())
        METRICS.study_scored(res.log_posterior, res.flagged, scorer.last_inference_s, scorer.device.type)
        log.info("study_scored", study_uid=res.study_uid, series_uid=res.series_uid,
                 log_posterior=round(res.log_posterior, 3), flagged=res.flagged, percentile=res.percentile,
                 model_version=res.model_version)
    return len(results)


# ------------------------------------------------------------------------------------------ report


def report_scored(store: Store, scorer: Scorer, cfg: Config, limit: int = 16) -> int:
    """Build SR and HL7 payloads for scored studies and put them in the outbox, then -> reported."""
    s = cfg.settings
    n = 0
    for study in store.studies_in_state("scored", limit=limit):
        asm = store.assembly(study.study_uid)
        score = store.score(study.study_uid)
        if asm is None or score is None:
            store.set_study_state(study.study_uid, "failed", reason="scored without a recorded score")
            continue
        result = ScoreResult(**{k: score[k] for k in ScoreResult.__dataclass_fields__ if k in score})
        instances = store.series_instances(asm.series_uid)
        source = [dcmread(i.path, stop_before_pixels=True) for i in instances]
        info = scorer.info
        key = (study.study_uid, asm.series_uid, str(asm.generation), result.model_version)
        folder = store.results_dir(study.study_uid)
        items: list[tuple[str, str, list[Path], str]] = []
        for route in plan_routes(result, s.routing, s.pacs, s.hl7):
            if route.kind == "dicom-sr":
                sr_path = folder / f"sr-{asm.generation}.dcm"
                if not sr_path.exists():
                    sr = build_sr(result, source, info, series_instance_uid=_uid("sr-series", *key),
                                  sop_instance_uid=_uid("sr", *key),
                                  content_datetime=datetime.fromtimestamp(score["scored_at"], UTC))
                    store.write_result_file(sr_path, lambda f, sr=sr: sr.save_as(f, enforce_file_format=True))
                items.append(("dicom", route.destination, [sr_path], _route_target(route)))
            elif route.kind == "dicom-source":
                items.append(("dicom", route.destination, [i.path for i in instances], _route_target(route)))
            elif route.kind == "hl7":
                hl7_path = folder / f"oru-{asm.generation}.hl7"
                if not hl7_path.exists():
                    msg = build_oru(result, source[0], info, s.hl7, control_id=_uid("hl7", *key)[-20:],
                                    when=datetime.fromtimestamp(score["scored_at"], UTC))
                    store.write_result_file(hl7_path, lambda f, m=msg: f.write(m.encode("utf-8")))
                items.append(("hl7", route.destination, [hl7_path], _route_target(route)))
        store.enqueue_results(study.study_uid, asm.generation, items)
        n += 1
    return n


def _route_target(route) -> str:
    return f"{route.ae_title}@{route.host}:{route.port}"


# ------------------------------------------------------------------------------------------ send


@dataclass
class Sender:
    """Drains the outbox: one destination object per target, retries scheduled in the store."""

    store: Store
    cfg: Config

    def destination(self, kind: str, name: str, target: str) -> Destination:
        s = self.cfg.settings
        ae, _, hostport = target.partition("@")
        host, _, port = hostport.rpartition(":")
        if kind == "hl7":
            return MLLPDestination(name, host, int(port), timeout_s=s.hl7.timeout)
        return DicomStoreDestination(name, ae, host, int(port), s.pacs.calling_ae_title,
                                     timeout_s=s.dicom.network_timeout)

    def drain(self, now: float | None = None, limit: int = 32) -> int:
        o = self.cfg.settings.outbox
        now = time.time() if now is None else now
        done = 0
        for row in self.store.outbox_due(now, limit=limit):
            dest = self.destination(row.kind, row.destination, row.target)
            try:
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
                METRICS.result_acknowledged(max(0.0, time.time() - finished))
        return done


