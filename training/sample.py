"""`training sample`: fictional volumes drawn from a trained Glow (the paper's Fig. 15).

Why: samples show what a model has learned of anatomy, and a model whose samples are noise or flat
grey has not converged, whatever its bits/dim say. Each sample is written as ``sample_NNN.npz`` (key
``data``, uint8 on the model's 7-bit lattice, the same layout as assembled volumes, so the viewers and
``training.data.sources.load_volume_dir`` read them) and a PNG montage of their middle slices. Seeded:
the same model, seed and temperature give the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triage.model.glow import Glow


class SampleError(Exception):
    """The model cannot be loaded or the arguments make no sense."""


def draw(model: Glow, n: int, temperature: float, seed: int, batch: int = 4) -> tuple[np.ndarray, int]:
    """n samples as uint8 (n, C, *image_shape), plus how many voxels came out non-finite.

    Drawn in batches from one seeded generator; a non-finite voxel (possible at high temperature on a
    barely trained model) is written as 0 and counted rather than cast to an arbitrary integer.
    """
    g = torch.Generator().manual_seed(int(seed))
    out: list[np.ndarray] = []
    bad = 0
    model.eval()
    for start in range(0, n, batch):
        x = model.sample(min(batch, n - start), temperature=temperature, generator=g)
        finite = torch.isfinite(x)
        bad += int((~finite).sum())
        x = torch.where(finite, x, torch.full_like(x, -0.5))
        out.append(model.to_uint(x).cpu().numpy())
    return np.concatenate(out), bad


def mid_slice(volume: np.ndarray) -> np.ndarray:
    """The middle axial slice of a (C, D, H, W) volume, or the image of a (C, H, W) one."""
    v = volume[0]
    return v[v.shape[0] // 2] if v.ndim == 3 else v


def write_montage(samples: np.ndarray, path: Path, vmax: int, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(samples)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    size = (2.2 * cols, 2.2 * rows + (0.4 if title else 0.0))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(mid_slice(samples[i]), cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{i:03d}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_to_dir(
    model_path: Path, n: int, temperature: float, out: Path, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """Draw ``n`` samples from the model file and write them under ``out``; returns a JSON summary."""
    if n < 1:
        raise SampleError(f"--n must be >= 1, got {n}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SampleError(f"--temperature must be > 0, got {temperature}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda, but no CUDA device is available")
    dev = torch.device("cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
    try:
        model = Glow.load(model_path, map_location=dev)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise SampleError(f"{model_path}: cannot load model: {exc}") from exc
    samples, bad = draw(model, n, temperature, seed)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, s in enumerate(samples):
        f = out / f"sample_{i:03d}.npz"
        np.savez_compressed(
            f,
            data=s[0] if s.shape[0] == 1 else s,
            temperature=np.float64(temperature),
            seed=np.int64(seed),
            model=np.str_(str(model_path)),
        )
        files.append(f.name)
    montage = out / "montage.png"
    role = getattr(model, "extra_info", {}).get("role", "")
    write_montage(samples, montage, 2**model.cfg.n_bits - 1, f"{model_path.name} {role} T={temperature:g}")
    return {
        "model": str(model_path),
        "n": n,
        "temperature": temperature,
        "seed": seed,
        "out": str(out),
        "files": files,
        "montage": montage.name,
        "nonfinite_voxels": bad,
        "shape": list(samples.shape[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="training sample", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="a Glow model file (training train --out)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--temperature", type=float, default=0.7, help="latent std scale (paper: 0.7)")
    p.add_argument("--out", type=Path, required=True, help="folder for sample_NNN.npz and montage.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    args = p.parse_args(argv)
    try:
        summary = sample_to_dir(args.model, args.n, args.temperature, args.out, args.seed, args.device)
    except SampleError as exc:
        print(f"training sample: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
