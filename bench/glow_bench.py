"""Glow speed and memory per preset and numeric variant: scoring and training seconds per volume.

For each preset that fits this machine it measures, in a fresh subprocess (so peak memory is that
preset's alone): seconds per volume forward-only (eval, no grad, as scoring runs) and forward+backward
(train mode, as training runs), peak resident memory (CPU) or peak allocated memory (CUDA), FLOPs per
volume counted by ``torch.utils.flop_counter``, and the achieved fraction of this machine's matmul
peak, itself measured in the same run (a large matmul in the variant's precision: float32 for fp32, bf16 for
bf16), so the ratio is against a peer measured here and now. On a CUDA machine it also searches the
largest batch that fits for training.

Variants (``--variants``): ``fp32``; ``bf16`` (the coupling nets under bf16 autocast, the likelihood in
float32: ``Glow.set_precision``); ``+cl`` channels-last memory format; ``+compile`` ``torch.compile``
of the model. Each is timed at the preset's training batch size (per volume), in its own process.

    python bench/glow_bench.py [--presets cpu-small,test-tiny] [--variants fp32,bf16] [--repeat 3]
                               [--out bench/results/glow.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.presets import config_from_preset, load_presets  # noqa: E402
from triage.model.glow import Glow  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "glow.json"


def matmul_peak_gflops(device: torch.device, n: int = 2048, repeat: int = 5,
                       dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate in ``dtype``: the yardstick for 'fraction of peak'."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _estimate_train_bytes(model: Glow) -> int:
    """Rough training memory: weights + Adam + gradients, plus ~8 activations of each step's width."""
    params = sum(p.numel() for p in model.parameters()) * 4 * 4
    cfg = model.cfg
    voxels = 1
    for s in cfg.image_shape:
        voxels *= s
    act = 0
    factor = 2**cfg.ndim
    for _ in range(cfg.levels):
        voxels //= factor
        act += cfg.depth * 8 * cfg.width * voxels * 4
    return params + act


def bench_one(name: str, repeat: int, device: torch.device, variant: str = "fp32",
              batch: int | None = None) -> dict:
    torch.manual_seed(0)
    cfg = config_from_preset(name)
    parts = variant.split("+")
    precision = parts[0]
    raw_model = Glow(cfg).to(device)
    raw_model.set_precision(precision)
    raw_model.set_channels_last("cl" in parts)
    params = sum(p.numel() for p in raw_model.parameters())
    batch = int(batch or cfg.extra.get("batch_size", 1))
    if device.type == "cpu":
        batch = min(batch, 4)  # paper presets' batches are GPU-sized
    x = torch.randint(0, 128, (batch, 1, *cfg.image_shape), device=device)
    raw_model.train()
    with torch.no_grad():
        raw_model.bits_per_dim(x, noise=True)  # ActNorm data-dependent init
    raw_model.eval()
    model = torch.compile(raw_model) if "compile" in parts else raw_model
    out: dict = {"preset": name, "variant": variant, "batch": batch, "params": params,
                 "image_shape": list(cfg.image_shape)}

    def fwd() -> None:
        with torch.no_grad():
            model.bits_per_dim(x)

    fwd()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fwd()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out["forward_s"] = min(times) / batch
    out["forward_flops"] = _flops(fwd) / batch

    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else (
        torch.cuda.get_device_properties(device).total_memory
    )
    est = _estimate_train_bytes(raw_model) * batch
    if est > 0.7 * total_mem:
        out["train_s"] = None
        out["train_skipped"] = f"estimated {est / 2**30:.0f} GiB for training exceeds this machine"
    else:
        model.train()
        opt = torch.optim.Adam(raw_model.parameters(), lr=1e-4)

        def step() -> None:
            loss = model.bits_per_dim(x, noise=True).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()

        step()
        _sync(device)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            step()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out["train_s"] = min(times) / batch
        out["train_flops"] = _flops(step) / batch
        if device.type == "cuda":
            out["max_train_batch"] = _largest_batch(raw_model, cfg.image_shape, device)
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        out["peak_mem_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _largest_batch(model: Glow, shape: tuple[int, ...], device: torch.device) -> int:
    """Double the batch until a training step runs out of memory (CUDA only)."""
    best, b = 0, 1
    while b <= 1024:
        try:
            x = torch.randint(0, 128, (b, 1, *shape), device=device)
            model.bits_per_dim(x, noise=True).mean().backward()
            model.zero_grad(set_to_none=True)
            best = b
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="", help="comma list; default: every preset that fits")
    ap.add_argument("--variants", default="fp32,bf16",
                    help="comma list of fp32|bf16 with optional +cl (channels-last) and +compile")
    ap.add_argument("--batch", type=int, help="batch size (default: the preset's, at most 4 on a CPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one preset, print JSON
    ap.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.one:
        print(json.dumps(bench_one(args.one, args.repeat, device, args.variant, args.batch)))
        return 0

    names = [n for n in args.presets.split(",") if n] or list(load_presets())
    variants = [v for v in args.variants.split(",") if v]
    peaks = {"fp32": matmul_peak_gflops(device), "bf16": matmul_peak_gflops(device, dtype=torch.bfloat16)}
    rows = []
    for name in names:
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", name, "--variant", variant,
                   "--repeat", str(args.repeat), "--device", args.device]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()[-1:]
                rows.append({"preset": name, "variant": variant, "error": err})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            peak = peaks[variant.split("+")[0]]
            row["forward_fraction_of_peak"] = row["forward_flops"] / row["forward_s"] / 1e9 / peak
            if row.get("train_s"):
                row["train_fraction_of_peak"] = row["train_flops"] / row["train_s"] / 1e9 / peak
            rows.append(row)
    _add_speedups(rows)

    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        },
        "matmul_peak_gflops": peaks["fp32"],
        "matmul_peak_gflops_bf16": peaks["bf16"],
        "presets": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0


def _add_speedups(rows: list[dict]) -> None:
    """Each variant's speed-up over the same preset's fp32 row of the same run."""
    base = {r["preset"]: r for r in rows if r.get("variant") == "fp32" and "error" not in r}
    for r in rows:
        b = base.get(r["preset"])
        if b is None or "error" in r:
            continue
        r["forward_speedup"] = b["forward_s"] / r["forward_s"]
        if r.get("train_s") and b.get("train_s"):
            r["train_speedup"] = b["train_s"] / r["train_s"]


def render(result: dict) -> str:
    lines = [
        f"device: {result['machine']['device']}, {result['machine']['cpus']} CPUs, torch "
        f"{result['machine']['torch']}; measured matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s "
        f"float32, {result.get('matmul_peak_gflops_bf16', float('nan')):.1f} GFLOP/s bf16",
        "",
        "| preset | variant | batch | shape | params | fwd s/vol | fwd GFLOP | fwd % peak | fwd x fp32 "
        "| fwd+bwd s/vol | fwd+bwd GFLOP | fwd+bwd % peak | fwd+bwd x fp32 | peak mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["presets"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r.get('variant', '')} | error: {r['error']} ||||||||||||")
            continue
        shape = "x".join(map(str, r["image_shape"]))
        if r.get("train_s"):
            pct = 100 * r["train_fraction_of_peak"]
            train = (f"{r['train_s']:.3f} | {r['train_flops'] / 1e9:.1f} | {pct:.0f}% | "
                     f"{r.get('train_speedup', float('nan')):.2f}x")
        else:
            train = f"skipped: {r.get('train_skipped', '')} | – | – | –"
        lines.append(
            f"| {r['preset']} | {r.get('variant', 'fp32')} | {r.get('batch', 1)} | {shape} | "
            f"{r['params'] / 1e6:.2f} M | {r['forward_s']:.3f} | "
            f"{r['forward_flops'] / 1e9:.1f} | {100 * r['forward_fraction_of_peak']:.0f}% | "
            f"{r.get('forward_speedup', float('nan')):.2f}x | {train} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} MiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
