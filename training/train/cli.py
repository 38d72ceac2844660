"""``training train`` (also ``python -m training.train`` and ``torchrun -m training.train``): arguments
to :func:`training.train.loop.train`, one JSON summary line out (rank 0), errors as one line and exit 1.

Apart from the loop so the loop module holds the training itself; ``training.train.loop.main`` still
runs this, for older scripts and ``python -m training.train.loop``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training.data.sources import resolve_data
from training.errors import TrainingError
from training.train.loop import ROLES, train
from triage.model.glow import PRECISIONS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training train",
        description="Train M0 (--role normal) or M1 (--role mixture). Runs as is, or under "
        "`torchrun --nproc_per_node=N -m training.train ...` for data-parallel training.",
    )
    p.add_argument("data", type=Path, help="folder of DICOM studies (recursive), or of .npz volumes")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--preset", required=True, help="a preset of training/presets.toml")
    p.add_argument("--out", required=True, type=Path, help="model file to write (checkpoint: OUT.ckpt)")
    p.add_argument("--labels", type=Path, help="labels.csv (study_uid,label,lesion)")
    p.add_argument("--only", help="keep only volumes with this label (e.g. normal); needs --labels")
    p.add_argument("--steps", type=int, help="number of steps (default: the preset's steps or epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if it exists")
    p.add_argument("--init-from", type=Path, help="warm start from this model file")
    p.add_argument("--lr", type=float,
                   help="base learning rate (default: the preset's lr, or its finetune_lr with --init-from)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", choices=PRECISIONS,
                   help="coupling nets in fp32 or bf16 (default: the preset's precision, else fp32)")
    p.add_argument("--cache", type=Path, help="volume cache for DICOM input (default ~/.cache/glowtriage)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=10,
        help="steps between in-memory last-good states for the NaN guard (host RAM: 2 copies of "
        "model + Adam state)",
    )
    p.add_argument("--summary", type=Path, help="also write the JSON summary (with the loss curve) here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``training train`` with ``argv``; 0 on success, 1 on a TrainingError (printed as one line)."""
    args = _parser().parse_args(argv)
    from triage.ops.logs import configure

    configure(level=os.environ.get("GLOWTRIAGE_LOG_LEVEL", "info"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        vs = resolve_data(args.data, args.labels, args.only, args.cache)
        result = train(
            vs,
            args.preset,
            args.out,
            role=args.role,
            seed=args.seed,
            steps=args.steps,
            resume=args.resume,
            init_from=args.init_from,
            lr=args.lr,
            precision=args.precision,
            progress=not args.no_progress,
            device=args.device,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            snapshot_every=args.snapshot_every,
        )
    except TrainingError as exc:
        print(f"training train: error: {exc}", file=sys.stderr)
        return 1
    if rank0:
        if args.summary:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(result.summary(with_curve=True), indent=1) + "\n")
        print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
