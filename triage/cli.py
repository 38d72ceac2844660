"""`triage serve | score | status | models | store | check-config`.

Heavy imports (torch, pynetdicom) happen inside the commands, so `triage check-config` answers fast.
Exit codes: 0 success, 1 a runtime failure (message on stderr), 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.config import Config, check, load_or_exit

if TYPE_CHECKING:
    from triage.model.registry import ModelSet

KIND_NAMES = {"ct": "head CT", "cxr": "chest radiograph"}  # what `status` calls each kind of model set


def _config(args: argparse.Namespace) -> Config:
    return load_or_exit(args.config)


def _configure_logs(cfg: Config, stream_json: bool = False) -> None:
    from triage.ops.logs import configure

    s = cfg.settings.logging
    configure(s.level, "json" if stream_json else s.format, stream=sys.stderr if stream_json else None)


# ------------------------------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _configure_logs(cfg)
    from triage.daemon import serve

    return serve(cfg)


# ------------------------------------------------------------------------------------------ score


def cmd_score(args: argparse.Namespace) -> int:
    """Score DICOM folders offline, one JSON object a study (the contract in DESIGN.md)."""
    cfg = _config(args)
    _configure_logs(cfg, stream_json=True)
    from triage.assemble.folders import folder_studies
    from triage.model.registry import Registry
    from triage.model.score import Scorers, ScoringError, VolumeInput

    models = Path(args.models) if args.models else cfg.models_dir
    try:  # the current set of every kind: head-CT studies and chest radiographs each go to their own
        scorer = Scorers.from_registry(Registry(models), device=args.device or cfg.settings.scoring.device,
                                       flag_policy=cfg.settings.scoring.flag_policy)
    except ScoringError as exc:
        print(f"triage score: {exc}", file=sys.stderr)
        return 1
    try:
        studies = list(folder_studies(args.paths, cfg.settings.assembly))
    except FileNotFoundError as exc:
        print(f"triage score: {exc}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for st in studies:
        if st.volume is None or st.series_uid is None:
            row: dict[str, Any] = {"study_uid": st.study_uid, "rejected": True, "reason": st.reason}
        elif not scorer.accepts(st.volume.data):
            kind = "chest radiograph" if st.volume.data.ndim == 2 else "head CT"
            row = {"study_uid": st.study_uid, "rejected": True,
                   "reason": f"no current model set for a {kind} (current: {', '.join(scorer.by_kind)})"}
        else:
            res = scorer.score([VolumeInput(st.study_uid, st.series_uid, st.volume.data,
                                            st.volume.metadata())])[0]
            row = res.to_json()
            # assembly's (content vs headers, resampling, sharp kernel), then the scorer's (a set made on
            # volumes of another preprocessing version)
            row["warnings"] = list(dict.fromkeys([*st.warnings, *res.warnings]))
            row["selection"] = st.selection  # the chosen series and the rule it won by
            if args.save_volumes:
                from triage.assemble.volume import save_volume

                out = Path(args.save_volumes) / f"{st.study_uid}.npz"
                save_volume(st.volume, out)
                row["volume"] = str(out)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        elif row.get("rejected"):
            print(f"{st.study_uid}  REJECTED  {row['reason']}")
        else:
            flag = "FLAGGED" if row["flagged"] else "-"
            where = "" if row.get("region_score") is None else (
                f"  region {row['region_score']:7.2f} p{row['region_percentile']:5.1f} at "
                + ("?" if row.get("region_center_mm") is None else
                   "[" + ", ".join(f"{v:.0f}" for v in row["region_center_mm"]) + "] mm"))
            print(f"{st.study_uid}  {row['log_posterior']:12.2f}  p{row['percentile']:5.1f}{where}  {flag}")
            for w in row["warnings"]:
                print(f"    warning: {w}")
    return 0


# ------------------------------------------------------------------------------------------ status


def _model_set_status(s: ModelSet) -> dict[str, Any]:
    """One current set for ``triage status``: what scores, and the operating point it was calibrated to."""
    op = s.manifest["operating_point"]
    cal = s.manifest.get("calibration") or {}
    prov = (s.manifest.get("provenance") or {}).get("calibration") or {}
    from triage.model.score import CURRENT_PREPROCESSING

    made_on = str(s.manifest.get("preprocessing_version", ""))
    return {
        "version": s.version, "kind": s.kind, "preset": s.manifest.get("preset"),
        "created": s.manifest.get("created"),
        # a set made on volumes of another assembly version scores off its calibration (README, nightly
        # retrain): say so where an operator looks
        "preprocessing": made_on, "preprocessing_current": made_on == CURRENT_PREPROCESSING.get(s.kind),
        "calibration": {
            "threshold": op["threshold"], "method": op["method"], "normals": len(s.calibration_scores),
            "region": bool(cal.get("region")), "reference_volumes": len(cal.get("reference_volumes") or []),
            **{k: prov[k] for k in ("sensitivity", "specificity", "n_abnormal") if k in prov},
            **({"recalibrated_from": cal["recalibrated_from"]} if cal.get("recalibrated_from") else {}),
        },
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Queues, recent studies, and per kind (head CT, chest radiograph): the current model set, its
    calibration, how many studies it and its predecessors scored, and the last nightly retrain."""
    cfg = _config(args)
    from triage.model.registry import KINDS, Registry, RegistryError
    from triage.ops.history import read_history
    from triage.store.db import Store

    root = cfg.storage_root
    by_version: dict[str, int] = {}
    if not (root / "state.db").exists():
        studies, queues = [], {}
    else:
        with Store(root) as store:
            studies = [
                {"study_uid": s.study_uid, "state": s.state, "instances": s.instances, "reason": s.reason}
                for s in store.studies(limit=args.limit)
            ]
            queues = store.queue_counts()
            queues.update({f"outbox_{k}": v for k, v in store.outbox_counts().items()})
            by_version = store.scored_by_model_version()
    reg = Registry(cfg.models_dir)
    try:
        currents = reg.currents()
    except RegistryError:
        currents = {}
    model_sets = {k: _model_set_status(s) for k, s in currents.items()}
    scored = {k: 0 for k in KINDS}
    for version, n in by_version.items():
        try:
            kind = reg.get(version).kind
        except RegistryError:  # a set removed since: its studies still count, as "unknown"
            kind = "unknown"
        scored[kind] = scored.get(kind, 0) + n
    retrains: dict[str, dict[str, Any]] = {}
    for rec in read_history(cfg.models_dir):
        kind = str(rec.get("kind") or "ct")  # a record from before kinds is a head-CT retrain
        retrains[kind] = {k: rec.get(k) for k in ("outcome", "finished", "reason", "version")}
    head = currents.get("ct")
    if args.json:
        print(json.dumps({"studies": studies, "queues": queues, "model_set": head.version if head else None,
                          "model_sets": model_sets, "scored_by_kind": scored, "last_retrain": retrains}))
        return 0
    for kind in KINDS:
        ms = model_sets.get(kind)
        name = KIND_NAMES[kind]
        if ms is None:
            print(f"{name + ':':<18} no current set (studies of this kind wait), {scored[kind]} scored")
            continue
        c = ms["calibration"]
        print(f"{name + ':':<18} {ms['version']}  preset={ms['preset']}  threshold={c['threshold']:.3f} "
              f"({c['method']}, {c['normals']} normals{', region' if c['region'] else ''})  "
              f"{scored[kind]} scored")
        if kind in retrains:
            r = retrains[kind]
            print(f"{'':<18} last retrain {r['finished']}: {r['outcome']}"
                  + (f" ({r['reason']})" if r.get("reason") else ""))
    if scored.get("unknown"):
        print(f"{'other sets:':<18} {scored['unknown']} scored by sets no longer in the registry")
    print("queues:    " + ", ".join(f"{k}={v}" for k, v in queues.items() if v) or "empty")
    for s in studies:
        reason = f"  ({s['reason']})" if s["reason"] else ""
        print(f"{s['study_uid']:<64} {s['state']:<10} {s['instances']:>5}{reason}")
    return 0


# ------------------------------------------------------------------------------------------ models


def cmd_models(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from triage.model.registry import Registry, RegistryError

    reg = Registry(Path(args.models) if args.models else cfg.models_dir)
    try:
        if args.action == "list":
            current = {cs.version for cs in reg.currents().values()}  # one current set per kind
            for s in reg.list():
                mark = "*" if s.version in current else " "
                st = _model_set_status(s)
                c = st["calibration"]
                stale = "" if st["preprocessing_current"] else " (STALE: not this software's assembly)"
                print(f"{mark} {s.version}  kind={s.kind}  preset={s.manifest['preset']}  "
                      f"threshold={c['threshold']:.3f} ({c['method']}, {c['normals']} normals"
                      f"{', region' if c['region'] else ''})  preprocessing={st['preprocessing']}{stale}  "
                      f"device_uid={s.manifest['device_uid']}")
        elif args.action == "show":
            s = reg.get(args.version) if args.version else reg.current(args.kind)
            if s is None:
                print("no current model set", file=sys.stderr)
                return 1
            m = dict(s.manifest)
            m["calibration"] = {**m["calibration"], "normal_scores": f"{len(s.calibration_scores)} scores"}
            print(json.dumps(m, indent=2))
        elif args.action == "promote":
            s = reg.promote(args.version, reason=args.reason or "manual promote")
            print(f"promoted {s.version}")
        elif args.action == "rollback":
            s = reg.rollback(reason=args.reason or "manual rollback", kind=args.kind)
            print(f"rolled back to {s.version}")
        elif args.action == "create":
            from triage.model.modelset import create_model_set

            s = create_model_set(cfg, reg, Path(args.m0), Path(args.m1), Path(args.calibrate),
                                 labels=Path(args.labels) if args.labels else None,
                                 specificity=args.specificity, device=args.device,
                                 trunk=Path(args.trunk) if args.trunk else None)
            print(f"created {s.version}  threshold={s.manifest['operating_point']['threshold']:.3f} "
                  f"({s.manifest['operating_point']['method']})")
            if args.promote:
                reg.promote(s.version, reason="created with --promote")
                print(f"promoted {s.version}")
    except RegistryError as exc:
        print(f"triage models: {exc}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ store


def cmd_store(args: argparse.Namespace) -> int:
    """``triage store rebuild``: a new state.db from the spool files (see triage.store.rebuild)."""
    cfg = _config(args)
    _configure_logs(cfg)
    from triage.store.rebuild import rebuild, state_db_problem

    root = cfg.storage_root
    problem = state_db_problem(root)
    if problem is None and (root / "state.db").exists() and not args.force:
        print(f"{root / 'state.db'} is usable; nothing to rebuild (--force rebuilds it anyway)",
              file=sys.stderr)
        return 1
    report = rebuild(root, reprocess_hours=args.reprocess_hours)
    print(json.dumps({"storage_root": str(root), "problem": problem, **report.as_dict()}))
    return 0


# ------------------------------------------------------------------------------------------ config


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("GLOWTRIAGE_CONFIG")
    problems = check(path)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{path or '<embedded defaults>'}: OK")
    return 2 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="triage", description="glowtriage: head-CT triage daemon")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", help="config.toml (default: $GLOWTRIAGE_CONFIG, else embedded defaults)")
        return p

    add("serve", "run the daemon in the foreground").set_defaults(func=cmd_serve)

    p = add("score", "score DICOM folders offline")
    p.add_argument("paths", nargs="+")
    p.add_argument("--models", help="model sets folder (default: <storage.root>/models)")
    p.add_argument("--json", action="store_true", help="one JSON object per study")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--save-volumes", metavar="DIR", help="also write each scored volume (.npz) here")
    p.set_defaults(func=cmd_score)

    p = add("status", "queues, recent studies and the current model set")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_status)

    p = add("models", "list | show | promote | rollback | create model sets")
    p.add_argument("action", choices=["list", "show", "promote", "rollback", "create"])
    p.add_argument("version", nargs="?")
    p.add_argument("--models", help="model sets folder (default: <storage.root>/models)")
    p.add_argument("--reason")
    p.add_argument("--m0", help="create: M0 (normal) model file")
    p.add_argument("--m1", help="create: M1 (mixture) model file")
    p.add_argument("--trunk", help="create: the model M0 and M1 branched from (kept for the nightly retrain)")
    p.add_argument("--calibrate", help="create: DICOM folder (or volumes) to set the operating point on")
    p.add_argument("--labels", help="create: labels.csv (study_uid,label,lesion): Youden cut-off")
    p.add_argument("--specificity", type=float, help="create without labels: specificity to keep")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--promote", action="store_true", help="create: make it current")
    p.add_argument("--kind", choices=["ct", "cxr"], default="ct",
                   help="show/rollback: which kind's current set (head CT or chest radiograph)")
    p.set_defaults(func=cmd_models)

    p = add("store", "rebuild: a new state.db from the spool files (stop the daemon first)")
    p.add_argument("action", choices=["rebuild"])
    p.add_argument("--reprocess-hours", type=float, default=24.0,
                   help="studies whose newest file is older are indexed but not scored or sent again")
    p.add_argument("--force", action="store_true", help="rebuild even when state.db looks usable")
    p.set_defaults(func=cmd_store)

    add("check-config", "validate config.toml and exit").set_defaults(func=cmd_check_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        if args.action in ("promote",) and not args.version:
            print("triage models promote: which version?", file=sys.stderr)
            return 2
        if args.action == "create" and not (args.m0 and args.m1 and args.calibrate):
            print("triage models create: --m0, --m1 and --calibrate are required", file=sys.stderr)
            return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
