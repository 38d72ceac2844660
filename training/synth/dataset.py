"""A labelled synthetic dataset: studies, ``labels.csv``, ``truth.jsonl``, and the ``training synth`` CLI.

Why apart from the study writer: the dataset decides which study gets which lesion (shuffled, so
folder order does not leak the label), where stray instances of other studies land, and writes the
label files every reader in the project uses (their first three columns never change).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from training.synth.study import write_study
from training.synth.truth import PATTERNS, StudyTruth, SynthOptions

__all__ = ["LABEL_COLUMNS", "main", "write_dataset", "write_stray"]

# labels.csv: the first three columns are what every reader uses; the rest are ground truth for the
# localization (lesion centroid, patient LPS mm; empty for normals) and the real-scanner patterns.
LABEL_COLUMNS = ("study_uid", "label", "lesion", "lesion_x", "lesion_y", "lesion_z", "kind", "patterns")


def write_stray(study_dir: Path, rng: np.random.Generator, *, options: SynthOptions, patient_index: int,
                name: str = "stray") -> StudyTruth:  # fmt: skip
    """Drop one CT slice of a new study of another patient into ``study_dir/name``.

    Why: PACS exports and associations mix in instances of other studies; a consumer must make
    them their own study (one image: no volume) instead of refusing or contaminating the host.
    """
    t = write_study(Path(study_dir) / name, rng, lesion=None, options=options, patient_index=patient_index,
                    stray=True)  # fmt: skip
    t.study_dir = f"{Path(study_dir).name}/{name}"
    return t


def label_row(t: StudyTruth) -> list[str]:
    """One labels.csv row in :data:`LABEL_COLUMNS` order."""
    c = t.lesion_centroid
    xyz = [f"{v:.3f}" for v in c] if c else ["", "", ""]
    return [t.study_uid, t.label, t.lesion, *xyz, t.kind, ";".join(t.patterns)]


def write_dataset(
    out: Path, normal: int, abnormal: int, seed: int, options: SynthOptions | None = None,
    stray_instances: int = 0,
) -> list[StudyTruth]:  # fmt: skip
    """Write ``normal + abnormal`` studies, ``labels.csv`` and ``truth.jsonl`` under ``out``.

    Abnormal studies alternate hemorrhage/infarct (hemorrhage gets the odd one), and the study order
    is shuffled so that folder index does not leak the label.  Study ``i`` uses its own generator
    seeded by (seed, i), so any single study can be regenerated without the others.
    ``stray_instances``: that many single slices of new studies (new patients) are dropped into
    randomly chosen study folders; they are listed after the studies with kind "stray".
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opts = options or SynthOptions()
    lesions: list[str | None] = [None] * normal + [
        "hemorrhage" if j % 2 == 0 else "infarct" for j in range(abnormal)
    ]
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(len(lesions))
    rows: list[StudyTruth] = []
    for i, li in enumerate(order):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        truth = write_study(
            out / f"study_{i:04d}", rng, lesion=lesions[int(li)], options=opts, patient_index=i
        )
        rows.append(truth)
    if stray_instances and rows:
        hosts = np.random.default_rng(np.random.SeedSequence([seed, 0x57A7])).permutation(len(rows))
        for j in range(stray_instances):
            host = out / rows[int(hosts[j % len(rows)])].study_dir
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57A7, j]))
            rows.append(write_stray(host, rng, options=opts, patient_index=len(order) + j,
                                    name=f"stray_{j + 1}"))  # fmt: skip
    with (out / "labels.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(LABEL_COLUMNS)
        for t in rows:
            wr.writerow(label_row(t))
    with (out / "truth.jsonl").open("w") as fh:
        for t in rows:
            fh.write(json.dumps(t.to_dict(), sort_keys=True) + "\n")
    return rows


def _fraction(text: str) -> float:
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError("fraction must be within [0, 1]")
    return x


def main(argv: list[str] | None = None) -> int:
    """``training synth``: write a synthetic labelled head-CT (or, ``--kind cxr``, chest) dataset."""
    p = argparse.ArgumentParser(prog="training synth",
                                description="Synthetic head-CT studies written as real DICOM.")  # fmt: skip
    frac = "fraction of studies (0-1) whose primary series gets this hard case"
    p.add_argument("--out", type=Path, required=True, help="dataset folder (created)")
    p.add_argument("--normal", type=int, required=True, help="number of normal studies")
    p.add_argument("--abnormal", type=int, required=True, help="abnormal studies (hemorrhage/infarct)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical dataset")
    p.add_argument("--tilt-fraction", type=_fraction, default=0.0, help=f"{frac}: gantry tilt 10-20 deg")
    p.add_argument("--tilt-shear-fraction", type=_fraction, default=0.0,
                   help="of tilted studies, fraction stepping along the table (sheared stack)")  # fmt: skip
    p.add_argument("--reverse-fraction", type=_fraction, default=0.0, help=f"{frac}: reversed numbering")
    p.add_argument("--missing-fraction", type=_fraction, default=0.0, help=f"{frac}: slice dropped")
    p.add_argument("--compressed-fraction", type=_fraction, default=0.0, help=f"{frac}: lossless compression")
    p.add_argument("--mixed-orientation-fraction", type=_fraction, default=0.0,
                   help=f"{frac}: two coronal images appended")  # fmt: skip
    pat_help = {
        "thin": "0.625 mm JPEG Lossless series, 8.5 deg tilt, one slice missing",
        "two_stack": "two stacks in one series (4 mm, then 7 mm), 18.5 deg tilt",
        "no_head_words": "no BodyPartExamined, protocol-only or foreign descriptions",
        "enhanced": "one Enhanced CT multi-frame instance",
        "bone_twin": "a sharp twin reconstruction; kernel names in no project list",
        "phantom": "a water cylinder phantom instead of a head",
    }
    for name in PATTERNS:
        p.add_argument(f"--{name.replace('_', '-')}-fraction", type=_fraction, default=0.0,
                       help=f"{frac}: {pat_help[name]}")  # fmt: skip
    p.add_argument("--thin-matrix", type=int, default=512, help="matrix of the thin series (pattern thin)")
    p.add_argument("--stray-instances", type=int, default=0, help="single slices of other studies mixed in")
    p.add_argument("--matrix", choices=["256", "512", "mixed"], default="256")
    p.add_argument("--no-distractors", action="store_true", help="write only the primary series")
    p.add_argument("--slab-samples", type=int, default=3, help="samples across thickness (1: fast)")
    p.add_argument("--kind", choices=["ct", "cxr"], default="ct",
                   help="ct: head-CT studies (the options above); cxr: chest radiographs (CR/DX)")
    p.add_argument("--lateral-fraction", type=_fraction, default=0.4,
                   help="cxr: fraction of studies with a lateral view beside the frontal one")
    p.add_argument("--synth-scale", type=float, default=1.0,
                   help="cxr: divide the devices' matrices by this (3: ~700 px images, fast)")
    a = p.parse_args(argv)
    if a.normal < 0 or a.abnormal < 0 or a.stray_instances < 0:
        p.error("--normal/--abnormal/--stray-instances must be >= 0")
    if a.kind == "cxr":
        from training.synth.cxr_dicom import write_cxr_dataset

        cx = write_cxr_dataset(a.out, a.normal, a.abnormal, a.seed, lateral_fraction=a.lateral_fraction,
                               synth_scale=a.synth_scale)  # fmt: skip
        print(f"wrote {len(cx)} chest radiograph studies ({sum(t.label == 'normal' for t in cx)} normal, "
              f"{sum(t.label == 'abnormal' for t in cx)} abnormal) to {a.out}")  # fmt: skip
        return 0
    opts = SynthOptions(
        matrix=a.matrix if a.matrix == "mixed" else int(a.matrix),
        tilt_fraction=a.tilt_fraction,
        tilt_shear_fraction=a.tilt_shear_fraction,
        reverse_fraction=a.reverse_fraction,
        missing_fraction=a.missing_fraction,
        compressed_fraction=a.compressed_fraction,
        mixed_orientation_fraction=a.mixed_orientation_fraction,
        distractors=not a.no_distractors,
        slab_samples=a.slab_samples,
        thin_matrix=a.thin_matrix,
        **{f"{name}_fraction": getattr(a, f"{name}_fraction") for name in PATTERNS},
    )
    rows = write_dataset(a.out, a.normal, a.abnormal, a.seed, opts, stray_instances=a.stray_instances)
    n_abn = sum(t.label == "abnormal" for t in rows)
    n_stray = sum(t.kind == "stray" for t in rows)
    print(f"wrote {len(rows) - n_stray} studies ({len(rows) - n_stray - n_abn} normal, {n_abn} abnormal)"
          f"{f' and {n_stray} stray instances' if n_stray else ''} to {a.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
