"""`training` command: synthetic data, training, evaluation, sampling.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches, so
importing the CLI does not import torch for ``training synth``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "synth": ("training.synth.dataset", "synthetic head-CT (--kind cxr: chest) studies, DICOM + labels.csv"),
    "train": ("training.train.loop", "train M0 (--role normal) or M1 (--role mixture) on DICOM folders"),
    "evaluate": ("training.evaluate.report", "ROC/AUC, histograms and montages from scores.jsonl"),
    "sample": ("training.sample", "write fictional volumes sampled from a model"),
    "experiment": ("training.experiment", "the synthetic M0/M1 experiment end to end (--kind cxr: chest)"),
}


def _usage() -> str:
    lines = ["usage: training COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"training: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
