"""Assembly time of the series issue 11 names: 238 slices, 512x512, 0.625 mm, JPEG Lossless SV1, 8.5 deg
gantry tilt, one slice missing (the thin series hospitals send most today).

The series is written once (``tests/unit/realseries.py``'s analytic head, soft-kernel noise, each file
re-encoded by dcmtk's dcmcjpeg) into ``--data`` (kept between runs), then ``assemble_study`` (headers,
selection, decode, slab averaging, tilt resampling, head finding, content check: everything the
daemon does between "series complete" and "volume saved") runs ``--runs`` times in this process.

    python bench/assembly_bench.py [--runs 5] [--data /tmp/glowtriage-assembly-bench] \
        [--out bench/results/assembly.json]

Prints a table (runs, p50, p95, min, max seconds) and writes the JSON with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit"))

from realseries import thin_zs, write_series  # noqa: E402

from triage.assemble.volume import assemble_study, group_studies, read_headers  # noqa: E402

N_SLICES = 238
STEP_MM = 0.625
STUDY_UID = "1.2.826.0.1.3680043.8.498.11.238"


def write_case(folder: Path) -> list[Path]:
    """The 238-slice series (239 planned, the 120th missing), unless ``folder`` already holds it."""
    existing = sorted(folder.glob("*.dcm"))
    if len(existing) == N_SLICES:
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    zs = thin_zs(step=STEP_MM, length=STEP_MM * N_SLICES)  # 239 positions
    del zs[120]
    return write_series(
        folder,
        zs,
        thickness=STEP_MM,
        study_uid=STUDY_UID,
        rows=512,
        ps=0.45,
        tilt_deg=8.5,
        noise="soft",
        jpeg_lossless=True,
        series_description="CTA Willis 80ml",
        names=lambda i: f"IM{i:04d}.dcm",
    )


def measure(files: list[Path], runs: int) -> tuple[list[float], dict[str, Any]]:
    times: list[float] = []
    info: dict[str, Any] = {}
    for _ in range(runs):
        t0 = time.perf_counter()
        headers, errors = read_headers(files)
        assert not errors, errors
        (series,) = group_studies(headers).values()
        sel, vol = assemble_study(series)
        times.append(time.perf_counter() - t0)
        assert vol is not None, sel.reason
        info = {
            "n_slices_source": vol.source_geometry["n_files"],
            "slices_resampled": vol.source_geometry.get("z_profile_slices", vol.source_geometry["n_slices"]),
            "warnings": vol.warnings,
            "transfer_syntaxes": vol.source_geometry["transfer_syntaxes"],
        }
    return times, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path("/tmp/glowtriage-assembly-bench"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "assembly.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    files = write_case(args.data)
    written_s = time.perf_counter() - t0
    times, info = measure(files, args.runs)
    p50, p95 = (float(np.percentile(times, q)) for q in (50, 95))
    print(f"{'series':<44} {'runs':>4} {'p50 s':>7} {'p95 s':>7} {'min s':>7} {'max s':>7}")
    print(
        f"{'238 x 512x512 JPEG Lossless, 0.625 mm, tilt':<44} {len(times):>4} {p50:7.2f} {p95:7.2f} "
        f"{min(times):7.2f} {max(times):7.2f}"
    )
    result = {
        "bench": "assembly",
        "series": {
            "slices": N_SLICES,
            "matrix": 512,
            "slice_mm": STEP_MM,
            "tilt_deg": 8.5,
            "missing_slices": 1,
            "transfer_syntax": "JPEG Lossless SV1 (dcmcjpeg +e1)",
            **info,
        },
        "runs": len(times),
        "seconds": times,
        "p50_s": p50,
        "p95_s": p95,
        "write_s": round(written_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
