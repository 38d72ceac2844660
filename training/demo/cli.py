"""The demo's command line and its run, phase by phase (the module docstring of :mod:`training.demo`
says what each phase does)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from training.demo.config import Ports, choose_ports, write_demo_config
from training.demo.data import make_data
from training.demo.models import install_model_set, train_models
from training.demo.peers import reset_daemon_state, running_peers, send_through_pacs, wait_terminal
from training.demo.plan import KIND_TEXT, MARKER, PLANS, REPO, TERMINAL, DemoError, Laps, Plan, say
from training.demo.results import (
    build_rows,
    hl7_priorities,
    print_deliveries,
    print_key_images,
    print_summary,
    print_table,
    read_truth,
    write_key_images,
)
from training.harness import HarnessError


@dataclasses.dataclass
class DemoConfig:
    """The daemon's config for this run and how it differs from the base one."""

    path: Path
    cfg: Any
    ports: Ports
    changes: list[str]
    base_name: str


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (both end the demo the same way: everything is stopped)."""
    stop = threading.Event()
    # Handlers for both, so a SIGINT also ends it where a shell started the demo with SIGINT ignored
    # (a background job).
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare_out(out: Path, fresh: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"{out} exists and is not a demo output folder (no {MARKER}); choose another --out")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m training.demo; --fresh deletes this folder\n")


def _quiet_runtime(quick: bool) -> None:
    """Warnings only on the console (the table is the output), one torch thread for the tiny preset."""
    from triage.ops.logs import configure

    configure("warning", "console", stream=sys.stderr)
    if quick:
        import torch

        # test-tiny is far too small to gain from threads, and on a busy machine idle OpenMP threads
        # spinning against other processes' make it 30x slower
        torch.set_num_threads(1)


def configure_daemon(args: argparse.Namespace, out: Path, plan: Plan) -> DemoConfig:
    """demo-out/config.toml from the base config (ports chosen now), and the daemon state reset."""
    from triage.config import ConfigError, load

    base = Path(args.config) if args.config else REPO / "config.toml"
    base_file = base if base.is_file() else None
    try:
        base_cfg = load(base_file)
    except ConfigError as exc:
        raise DemoError("; ".join(exc.lines)) from None
    ports = choose_ports(base_cfg, args.free_ports)
    path, changes = write_demo_config(out, base_file, ports, plan)
    cfg = load(path)
    reset_daemon_state(cfg.storage_root)
    return DemoConfig(path, cfg, ports, changes, str(base_file or "the embedded defaults"))


def _print_config(dc: DemoConfig, out: Path) -> None:
    say(f"\n[4/5] daemon, PACS and RIS  (config {dc.path.relative_to(out.parent)})")
    if dc.changes:
        say(f"  differs from {dc.base_name} only in:")
        for c in dc.changes:
            say(f"    {c}")
    else:
        say(f"  identical to {dc.base_name} (storage root: {dc.cfg.storage_root})")


def run_traffic(
    args: argparse.Namespace, out: Path, dc: DemoConfig, test_set: Path, plan: Plan, laps: Laps
) -> tuple[int, dict[str, Any]]:
    """Steps 4 and 5: peers up, the test studies through the PACS and the daemon, the table."""
    s = dc.cfg.settings
    truth = read_truth(test_set)
    uids = set(truth)
    code = 0
    with running_peers(out, dc.cfg, dc.path, dc.ports, laps) as peers:
        with laps.lap("send"):
            send_through_pacs(peers.orthanc, test_set, len(uids), s.dicom.ae_title)
        say(
            f"  waiting for every study to be sent (quiet period {s.assembly.quiet_seconds:g} s, then "
            "assemble, score, report, deliver):"
        )
        with laps.lap("triage"):
            studies = wait_terminal(peers.daemon, uids, timeout_s=args.timeout)
        if not all(studies.get(u, {}).get("state") in TERMINAL for u in uids):
            code = 1
        srs = {u: peers.orthanc.sr_count(u) for u in uids}
        messages = list(peers.mllp.messages)
        rows = build_rows(dc.cfg.storage_root, truth, studies, srs, hl7_priorities(messages, uids))
        key_dir = write_key_images(rows, dc.cfg.storage_root, out)
        say(
            "\n[5/5] triage table: most suspicious first (log p(normal|x) in nats; pctl: percentile among "
            "the calibration normals;\n      region: the most abnormal lesion-sized window of the voxel map, "
            "in normal s.d., rpctl its percentile;\n      by: the score(s) under their threshold when "
            "flagged; region centre: patient LPS mm)"
        )
        print_table(rows)
        result = print_summary(rows, plan)
        print_key_images(rows, str(key_dir.relative_to(out.parent)))
        result["key_images_dir"] = str(key_dir)
        print_deliveries(
            rows,
            len(messages),
            f"Orthanc AE {s.pacs.ae_title}, port {dc.ports.pacs}",
            str((dc.cfg.storage_root / "results").relative_to(out.parent)),
        )
        if args.keep_running:
            say(
                "\n  --keep-running: everything stays up. "
                f"`triage status --config {dc.path}`; Ctrl-C to stop."
            )
            _wait_for_interrupt()
    return code, result


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    plan = PLANS[(args.kind, bool(args.quick))]
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    out = Path(args.out or ("demo-out" if args.kind == "ct" else f"demo-out-{args.kind}")).resolve()
    _prepare_out(out, args.fresh)
    laps = Laps()

    say(f"glowtriage demo -> {out}  (preset {plan.preset}{', --quick' if args.quick else ''})")
    say(f"\n[1/5] synthetic {KIND_TEXT[plan.kind]}")
    with laps.lap("data"):
        sets = make_data(out, plan)
    _quiet_runtime(args.quick)
    say("\n[2/5] models: M0 on normals, M1 on the unlabeled mixture (training.train.loop)")
    with laps.lap("train"):
        m0, m1, train_info = train_models(out, sets, plan)
    dc = configure_daemon(args, out, plan)

    say(f"\n[3/5] model set: operating point on {plan.calibration} held-out normals (triage models create)")
    with laps.lap("model_set"):
        ms = install_model_set(dc.cfg, m0, m1, sets["calibration"], plan)
    op = ms.manifest["operating_point"]
    say(
        f"  model set {ms.version}: flag when log p(normal|x) < {op['threshold']:.1f} ({op['method']} on "
        f"the calibration normals)"
    )
    region = ms.manifest["calibration"].get("region")
    if region:
        thr = "(infinite threshold)" if region["threshold"] is None else f"< {region['threshold']:.2f}"
        wins = ("/".join(f"{w:.0f}" for w in region["windows_mm"]) + " mm" if "windows_mm" in region
                else ", ".join(f"1/{1 / w:.0f}" for w in region["windows_side"]) + " of the image side")
        say(
            f"  region score: flag when {thr} (normal s.d., windows {wins}; same "
            f"specificity on the calibration normals); flag_policy {dc.cfg.settings.scoring.flag_policy}"
        )
    else:
        say("  region score: not calibrated (needs >= 3 calibration normals): the global score flags alone")
    _print_config(dc, out)
    code, result = run_traffic(args, out, dc, sets["test"], plan, laps)

    total = time.perf_counter() - t_start
    timings = {**laps.seconds, "total": round(total, 1)}
    summary = {
        "plan": dataclasses.asdict(plan),
        "timings_s": timings,
        "models": train_info,
        "model_set": ms.version,
        "threshold": op["threshold"],
        "region_threshold": (region or {}).get("threshold"),
        "region_windows_mm": (region or {}).get("windows_mm"),
        "config": str(dc.path),
        "config_changes": dc.changes,
        "ports": dataclasses.asdict(dc.ports),
        **result,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    say(
        f"\n  stopped daemon, PACS and RIS. Wall time {total / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        + f"); {out / 'demo.json'}"
    )
    return code


def _parser() -> argparse.ArgumentParser:
    from training import demo

    p = argparse.ArgumentParser(
        prog="python -m training.demo", description=(demo.__doc__ or "").splitlines()[0]
    )
    p.add_argument("--out", help="output folder (default ./demo-out, with --kind cxr ./demo-out-cxr)")
    p.add_argument("--kind", choices=["ct", "cxr"], default="ct",
                   help="ct: head CTs (default); cxr: chest radiographs (CR/DX) through the chest path")
    p.add_argument("--config", help="base config.toml (default: the repo's config.toml)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and the test-tiny (or test-tiny-2d) preset (a smoke test)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first and redo everything")
    p.add_argument("--keep-running", action="store_true", help="leave daemon, PACS and RIS up until Ctrl-C")
    p.add_argument("--free-ports", action="store_true", help="free ports for everything, not the config's")
    p.add_argument(
        "--steps", type=int, help="trunk steps; M0 and M1 branch for half as many (default: the plan's)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the studies (default 900)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:  # DemoError, or a peer that would not start
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
