"""Train M0 (``--role normal``, normal studies) or M1 (``--role mixture``, the unlabeled mixture).

One process or several under ``torchrun`` (DistributedDataParallel; gloo on the CPU, nccl on CUDA).
The run is a pure function of (data, preset, seed, number of steps), whatever the number of
processes and however often it was interrupted:

- Data order and dequantization noise come from two seeded ``torch.Generator``\\ s that every process
  advances identically. Each step draws the *global* batch (``batch_size`` of the preset) and its
  noise, and each rank trains on its own equal slice; DDP averages the per-rank mean gradients, which
  is the gradient of the global mean. So two processes follow the single-process loss curve up to
  float round-off, and a checkpoint written by one layout resumes in another.
- ActNorm is initialized from one seeded batch on every rank before DDP wraps the model, so the
  replicas start identical without a broadcast.
- A checkpoint (``<out>.ckpt``) holds model, optimizer, step, generator states and the position in
  the data order; ``--resume`` from it gives bit-for-bit the weights of an uninterrupted run on the
  CPU (deterministic algorithms are switched on there; on CUDA, equal up to kernel round-off). The
  learning-rate schedule depends on the step alone, so a finished run can also be extended with
  ``--resume --steps N``.
- A non-finite loss or gradient does not end a nightly run: the last state that proved finite is
  restored (model and Adam moments, kept in memory), the learning rate is halved for a while, and the
  event is counted in the model's provenance. Only ``max_nan_failures`` failures in a row give up.

Input is a *volume source* (:class:`training.data.sources.VolumeSet`): uint8 volumes with ids, which
:func:`training.data.sources.resolve_data` makes from a folder of DICOM studies or ``.npz`` volumes.
The pieces around the loop have their own modules: :mod:`training.train.settings` (what the preset
and arguments decide), :mod:`training.train.checkpoint` (resume, warm start, provenance helpers),
:mod:`training.train.guard` (the NaN guard) and :mod:`training.train.ddp` (processes under torchrun).
``python -m training.train`` and ``python -m training.train.loop`` both run :func:`main`; what a run
reports (its result and the provenance saved in the model) is :mod:`training.train.result`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.data.sources import VolumeSet, as_volume_set, ids_digest, prepare_volumes, resolve_data
from training.errors import TrainingError
from training.presets import config_from_preset
from training.train import ddp as ddp_mod
from training.train.augment import augment_of
from training.train.checkpoint import (
    CKPT_FORMAT,
    atomic_save,
    checkpoint_path,
    forget_stale_warm_start,
    load_checkpoint,
    now_iso,
    plain,
    to_cpu,
    warm_start_model,
    weights_digest,
)
from training.train.ddp import DistInfo, pick_device, setup_distributed
from training.train.guard import NanGuard
from training.train.result import TrainResult, provenance, window_mean
from training.train.settings import Settings, base_lr_of, hparam, lr_schedule_of, total_steps_of
from triage.model.glow import PRECISIONS, Glow, GlowConfig, bf16_supported
from triage.ops.logs import get_logger

# Names other modules import from here (the loop's public face; several now live in the modules above).
__all__ = [
    "ROLES", "StepHook", "TrainResult", "TrainingError", "VolumeSet", "checkpoint_path",
    "forget_stale_warm_start", "ids_digest", "main", "prepare_volumes", "resolve_data", "train",
    "weights_digest",
]

ROLES = ("normal", "mixture")
LN2 = math.log(2.0)

log = get_logger("train")


# A hook for fault injection in tests: called before each step with (step, model, noise of this rank's
# slice); it may corrupt the noise or the weights in place, or raise to simulate a crash.
StepHook = Callable[[int, Glow, Tensor], None]


# --------------------------------------------------------------------------------------------------
# Training machinery


class _NLL(nn.Module):
    """Per-volume bits/dim of dequantized data; a module so DDP can hook its forward.

    Same quantity as ``Glow.bits_per_dim(x, noise=True)``, but the uniform noise is passed in: it is
    drawn for the whole global batch from the shared generator, so every layout sees the same noise.
    """

    def __init__(self, glow: Glow):
        super().__init__()
        self.glow = glow

    def forward(self, x_uint: Tensor, u: Tensor) -> Tensor:
        bins = float(2**self.glow.cfg.n_bits)
        x = self.glow.preprocess(x_uint) + (u - 0.5) / bins  # bin midpoint + offset = (x + u)/bins - 0.5
        lp = self.glow.log_prob(x)
        return -lp / (self.glow.cfg.n_dims * LN2) + self.glow.cfg.n_bits


class _Order:
    """Endless seeded stream of shuffled indices, epoch after epoch; its position is checkpointed."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.g)
                self.pos, self.epoch = 0, self.epoch + 1
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + m])
            self.pos, k = self.pos + m, k - m
        return torch.cat(parts)

    def state(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch, "rng": self.g.get_state()}

    def load(self, s: Mapping[str, Any]) -> None:
        if int(s["perm"].numel()) != self.n:
            raise TrainingError(
                f"checkpoint data order covers {s['perm'].numel()} volumes, the data has {self.n}"
            )
        self.perm, self.pos, self.epoch = s["perm"].clone(), int(s["pos"]), int(s["epoch"])
        self.g.set_state(s["rng"])


def _derived_generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


class _Loop:
    """The state of one run (model, optimizer, data order, noise, guard, curve) and its step."""

    def __init__(
        self, glow: Glow, data: Tensor, s: Settings, guard: NanGuard, ddp: DistInfo, dev: torch.device
    ):
        self.glow, self.data, self.s, self.guard, self.ddp, self.dev = glow, data, s, guard, ddp, dev
        self.opt = torch.optim.Adam(glow.parameters(), lr=s.base_lr)
        self.order = _Order(data.shape[0], _derived_generator(s.seed, 1))
        self.noise_g = _derived_generator(s.seed, 2)
        self.aug_g = _derived_generator(s.seed, 4)  # drawn only when the run augments
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.last_grad_norm: float | None = None
        self.params = [p for p in glow.parameters() if p.requires_grad]
        self.net: nn.Module = _NLL(glow)

    def wrap(self) -> None:
        """Hand the network to DDP once ActNorm is initialized (replicas start identical)."""
        if self.ddp.active:
            self.net = ddp_mod.wrap(self.net, self.dev)

    def step(self, step: int, hook: StepHook | None) -> bool:
        """One global batch; False when it came out non-finite (and the last good state was restored)."""
        s = self.s
        idx = self.order.take(s.batch)
        u_all = torch.rand((s.batch, *self.data.shape[1:]), generator=self.noise_g)
        sl = slice(self.ddp.rank * s.local, (self.ddp.rank + 1) * s.local)
        xb = self.data[idx[sl]]
        if s.augment.active:
            flips, shifts = s.augment.draw(s.batch, self.aug_g)
            xb = s.augment.apply(xb, flips[sl], shifts[sl])
        xb = xb.to(self.dev, non_blocking=True)
        ub = u_all[sl].to(self.dev, non_blocking=True)
        if hook is not None:
            hook(step, self.glow, ub)
        lr = s.lr_at(step) * self.guard.lr_scale
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.net(xb, ub).mean()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if s.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # one collective decision: every rank restores or steps together
        stats = torch.stack([loss.detach().double(), (~torch.isfinite(gnorm.detach())).double()])
        if self.ddp.active:
            dist.all_reduce(stats)
            stats[0] /= self.ddp.world
        loss_val, bad_grad = (float(v) for v in stats.cpu())
        self.lrs.append(lr)
        if math.isfinite(loss_val) and bad_grad == 0.0:
            self.opt.step()
            self.losses.append(loss_val)
            self.last_grad_norm = float(gnorm)
            self.guard.success(step + 1, self.glow, self.opt)
            return True
        self.losses.append(float("nan"))
        self.last_grad_norm = None
        why = "non-finite loss" if not math.isfinite(loss_val) else "non-finite gradient"
        self.guard.failure(step, self.glow, self.opt, why)
        if self.ddp.rank == 0:
            log.warning(
                "nan_restored",
                step=step,
                reason=why,
                restores=self.guard.restores,
                lr_scale=self.guard.lr_scale,
            )
        return False

    def checkpoint(self, step: int, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "step": step,
            "model": to_cpu(self.glow.state_dict()),
            "optimizer": to_cpu(self.opt.state_dict()),
            "order": self.order.state(),
            "noise_rng": self.noise_g.get_state(),
            "aug_rng": self.aug_g.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guard": self.guard.state(),
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "meta": plain(meta),
            "written": now_iso(),
        }

    def restore(self, ck: Mapping[str, Any]) -> int:
        self.glow.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.order.load(ck["order"])
        self.noise_g.set_state(ck["noise_rng"])
        if "aug_rng" in ck:  # checkpoints from before augmentation never drew from it
            self.aug_g.set_state(ck["aug_rng"])
        torch.set_rng_state(ck["torch_rng"])
        self.guard.load(ck["guard"])
        self.losses = [float(v) for v in ck["losses"]]
        self.lrs = [float(v) for v in ck["lrs"]]
        return int(ck["step"])


def train(
    volumes: VolumeSet | Sequence[Any],
    preset: str,
    out: str | os.PathLike[str],
    *,
    role: str,
    seed: int = 0,
    steps: int | None = None,
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
    device: str = "auto",
    log_every: int = 10,
    checkpoint_every: int = 100,
    snapshot_every: int = 10,
    max_nan_failures: int = 5,
    nan_cooldown: int = 50,
    init_batch: int | None = None,
    hook: StepHook | None = None,
    lr: float | None = None,
    precision: str | None = None,
    augment: str | None = None,
) -> TrainResult:
    """Train one Glow on ``volumes`` and save it to ``out`` with its provenance.

    ``steps`` overrides the preset's steps/epochs. ``snapshot_every`` is how often the in-memory
    last-good state is refreshed (every checkpoint is also a snapshot point, so resumed runs match).
    ``init_batch`` volumes (default max(batch_size, 16)) initialize ActNorm. ``hook`` is for fault
    injection in tests. Under torchrun every rank calls this; only rank 0 writes files.
    ``lr`` overrides the base learning rate, which is otherwise the preset's ``lr``, or its
    ``finetune_lr`` for a warm start (``init_from``): a fine-tune at the full rate first throws away much
    of what the model it starts from knew.
    ``precision`` (``"fp32"`` or ``"bf16"``) overrides the preset's ``precision``: the coupling nets'
    compute type (:meth:`triage.model.glow.Glow.set_precision`), saved with the model so that it is
    scored the way it was trained.
    ``augment`` (``"on"`` or ``"off"``) overrides the preset's augmentation keys
    (:mod:`training.train.augment`: mirror and in-plane shift, label-free).
    """
    t_start = time.perf_counter()
    if role not in ROLES:
        raise TrainingError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    vs = volumes if isinstance(volumes, VolumeSet) else as_volume_set(volumes)
    out = Path(out)
    try:
        cfg = config_from_preset(preset)
    except KeyError as exc:
        raise TrainingError(str(exc.args[0])) from exc
    if precision is not None:
        if precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        cfg.extra["precision"] = precision
    data, ids = prepare_volumes(vs, cfg)
    ddp = setup_distributed(device)
    prev_det = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        dev = pick_device(device, ddp.local_rank)
        batch = int(hparam(cfg, "batch_size"))
        if batch % ddp.world:
            raise TrainingError(
                f"preset {preset}: batch_size {batch} cannot be split evenly across {ddp.world} processes"
            )
        every = max(1, checkpoint_every)
        s = Settings(
            role=role,
            preset=preset,
            seed=int(seed),
            total=total_steps_of(cfg, steps, len(ids), batch),
            batch=batch,
            local=batch // ddp.world,
            base_lr=base_lr_of(cfg, lr, init_from is not None),
            warmup=int(cfg.extra.get("warmup_steps", 0)),
            schedule=lr_schedule_of(cfg),
            grad_clip=float(cfg.extra.get("grad_clip", 0.0)),
            log_every=log_every,
            checkpoint_every=every,
            # every checkpoint is also a snapshot point, so a resumed run holds the same "last good" state
            snapshot_every=math.gcd(max(1, snapshot_every), every),
            augment=augment_of(cfg, augment),
        )
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        meta = {
            "role": role,
            "preset": preset,
            "seed": int(seed),
            "ids_sha256": ids_digest(ids),
            "volumes": len(ids),
            "started": now_iso(),
            "init_from": str(init_from) if init_from else None,
            "augment": s.augment.describe(),
        }
        torch.manual_seed(seed)
        glow = warm_start_model(Path(init_from), cfg) if init_from is not None else Glow(cfg)
        glow.set_precision(str(cfg.extra.get("precision", "fp32")))
        if glow.precision == "bf16" and not bf16_supported(dev):
            log.warning("bf16_not_native", device=str(dev),
                        hint="bf16 runs emulated here (slower than fp32); use --precision fp32")
        meta["precision"] = glow.precision
        glow = glow.to(dev).train()
        loop = _Loop(glow, data, s, NanGuard(s.snapshot_every, max_nan_failures, nan_cooldown), ddp, dev)
        result = _run(
            loop,
            vs,
            cfg,
            out,
            meta,
            resume=resume,
            progress=progress,
            init_batch=init_batch,
            hook=hook,
            init_from=Path(init_from) if init_from else None,
            t_start=t_start,
        )
        return result
    finally:
        torch.use_deterministic_algorithms(prev_det[0], warn_only=prev_det[1])
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    loop: _Loop,
    vs: VolumeSet,
    cfg: GlowConfig,
    out: Path,
    meta: dict[str, Any],
    *,
    resume: bool,
    progress: bool,
    init_batch: int | None,
    hook: StepHook | None,
    init_from: Path | None,
    t_start: float,
) -> TrainResult:
    s, ddp, lead = loop.s, loop.ddp, loop.ddp.rank == 0
    ckpt = checkpoint_path(out)
    if lead:
        out.parent.mkdir(parents=True, exist_ok=True)
    start_step = 0
    resumed_from: int | None = None
    if resume and ckpt.exists():
        ck = load_checkpoint(ckpt, meta)
        if int(ck["step"]) > s.total:
            raise TrainingError(
                f"{ckpt}: checkpoint is at step {ck['step']}, beyond the {s.total} steps asked for"
            )
        start_step = resumed_from = loop.restore(ck)
        meta["started"] = str(ck["meta"]["started"])
        if lead:
            log.info("train_resumed", checkpoint=str(ckpt), step=start_step)
    else:
        if resume and lead:
            log.info("train_resume_without_checkpoint", checkpoint=str(ckpt))
        if not _actnorm_initialized(loop.glow):
            _init_actnorm(loop.glow, loop.data, s.seed, init_batch or max(s.batch, 16), loop.dev)
    loop.guard.start(loop.glow, loop.opt)
    loop.wrap()
    bar = _progress_bar(progress and lead, s.total, start_step, s.preset, s.role)
    if lead:
        log.info(
            "train_started",
            role=s.role,
            preset=s.preset,
            volumes=meta["volumes"],
            steps=s.total,
            start_step=start_step,
            batch_size=s.batch,
            world_size=ddp.world,
            device=str(loop.dev),
            seed=s.seed,
        )
    for step in range(start_step, s.total):
        ok = loop.step(step, hook)
        done = step + 1
        if bar is not None:
            bar.update(1)
            if ok:
                bar.set_postfix(bpd=f"{loop.losses[-1]:.3f}", lr=f"{loop.lrs[-1]:.1e}", refresh=False)
        if lead and s.log_every > 0 and done % s.log_every == 0:
            log.info(
                "train_step",
                step=done,
                bpd=round(window_mean(loop.losses, done, s.log_every), 4),
                lr=loop.lrs[-1],
                grad_norm=loop.last_grad_norm,
                seconds=round(time.perf_counter() - t_start, 1),
            )
        if lead and (done % s.checkpoint_every == 0 or done == s.total):
            atomic_save(loop.checkpoint(done, meta), ckpt)
    if bar is not None:
        bar.close()

    losses = loop.losses
    window = max(1, min(10, s.total))
    means = [window_mean(losses, e, window) for e in range(1, len(losses) + 1)]
    means = [m for m in means if math.isfinite(m)]
    result = TrainResult(
        out=out,
        role=s.role,
        preset=s.preset,
        steps=s.total,
        updates=sum(1 for v in losses if math.isfinite(v)),
        final_bpd=window_mean(losses, len(losses), window),
        best_bpd=min(means) if means else float("nan"),
        seconds=time.perf_counter() - t_start,
        volumes=int(meta["volumes"]),
        nan_restores=loop.guard.restores,
        world_size=ddp.world,
        resumed_from=resumed_from,
        losses=losses,
        lrs=loop.lrs,
    )
    if lead:
        extra = provenance(
            result,
            cfg,
            vs,
            meta,
            seed=s.seed,
            batch=s.batch,
            base_lr=s.base_lr,
            dev=loop.dev,
            init_from=init_from,
        )
        loop.glow.save(out, extra=extra)
        log.info("train_done", **{k: v for k, v in result.summary().items() if k != "out"}, out=str(out))
    return result


def _actnorm_initialized(glow: Glow) -> bool:
    flags = [bool(b) for name, b in glow.named_buffers() if name.endswith("initialized")]
    return bool(flags) and all(flags)


@torch.no_grad()
def _init_actnorm(glow: Glow, data: Tensor, seed: int, k: int, dev: torch.device) -> None:
    """Data-dependent ActNorm init from ``k`` seeded volumes, identical on every rank."""
    g = _derived_generator(seed, 3)
    idx = torch.randperm(data.shape[0], generator=g)[: min(k, data.shape[0])]
    u = torch.rand((len(idx), *data.shape[1:]), generator=g)
    net = _NLL(glow).train()
    net(data[idx].to(dev), u.to(dev))
    glow.mark_initialized()


def _progress_bar(enabled: bool, total: int, initial: int, preset: str, role: str) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{role}/{preset}", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# CLI


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
