"""Glow normalizing flow for 2-D images and 3-D volumes, as the paper uses it.

Follows Kingma & Dhariwal (2018) with the changes of the paper (Shibata et al., sections 3.2, 4.2,
Appendix B): the latents at every level are N(0, I) (mean 0 and variance 1 fixed, no learned prior by
default), the affine coupling scale is ``sigmoid(h - 0.1) + 0.6`` instead of ``sigmoid(h + 2)``, and
the 3-D extension squeezes 2x2x2 voxels into 8 channels and mixes channels with an invertible
1x1x1 convolution whose log-determinant is ``D*H*W * log|det K|`` (eq. B.3).

Layout: ``x`` is ``(B, C, *spatial)``. A level is: squeeze, ``depth`` steps of
(ActNorm -> invertible 1x1(x1) conv -> affine coupling), then a split that factors out half the
channels as a latent (every level but the last). ``encode`` returns the latents finest first and the
coarsest last, plus the summed log-determinant; ``decode`` is its exact inverse.

Why LU for the 1x1 conv: ``log|det W|`` becomes ``sum(log|s|)`` (O(C) instead of O(C^3)), and the
inverse stays cheap and stable, which keeps likelihoods exact on the large channel counts of the
coarse levels.

Data convention (paper, eq. 4): a CT volume is windowed to 7 bits, ``clip(HU + 14, 0, 127)``; the flow
sees ``x / 2**n_bits - 0.5``, plus uniform noise within the bin in training (dequantization) and the
bin's midpoint when scoring, so the same volume always gets the same score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


PRECISIONS = ("fp32", "bf16")


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 convolutions run natively here (AVX512-BF16/AMX via oneDNN, or a CUDA GPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16_conv_broken(x: Tensor) -> bool:
    """Shapes where bf16 convolutions must not be used: 3-D inputs of depth 2 on the CPU.

    torch 2.13's CPU (oneDNN) bf16 ``conv3d`` computes garbage *weight gradients* (NaN, 1e30) for a
    3x3x3 kernel on inputs of depth 2, while the forward pass and the input gradient are right
    (measured; the coarsest level of the paper's 32x128x128 Glow and of test-tiny has depth 2). Such
    couplings run in float32, for training and scoring alike, so a model computes one function.
    """
    return x.dim() == 5 and x.shape[2] == 2 and x.device.type == "cpu"


@dataclass
class GlowConfig:
    """Architecture of one flow. Sizes for real use live in training/presets.toml."""

    ndim: Literal[2, 3]
    image_shape: tuple[int, ...]
    levels: int
    depth: int
    width: int
    in_channels: int = 1
    n_bits: int = 7
    scale_fn: Literal["paper", "glow"] = "paper"  # paper: sigmoid(h-0.1)+0.6; glow: sigmoid(h+2)
    learn_split_prior: bool = False  # paper: N(0, I) at every level
    actnorm_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # preset keys that do not shape the network

    def __post_init__(self) -> None:
        self.image_shape = tuple(int(s) for s in self.image_shape)
        if self.ndim not in (2, 3):
            raise ValueError(f"GlowConfig.ndim must be 2 or 3, got {self.ndim}")
        if len(self.image_shape) != self.ndim:
            raise ValueError(f"GlowConfig.image_shape {self.image_shape} does not have ndim={self.ndim} axes")
        if self.levels < 1 or self.depth < 1 or self.width < 1:
            raise ValueError("GlowConfig.levels, depth and width must be >= 1")
        f = 2**self.levels
        bad = [s for s in self.image_shape if s % f]
        if bad:
            raise ValueError(
                f"GlowConfig.image_shape {self.image_shape}: every axis must be divisible by 2**levels={f}"
            )
        if self.scale_fn not in ("paper", "glow"):
            raise ValueError(f"GlowConfig.scale_fn must be 'paper' or 'glow', got {self.scale_fn!r}")

    @property
    def n_dims(self) -> int:
        """Number of scalar dimensions of one input (C * prod(spatial))."""
        return self.in_channels * math.prod(self.image_shape)


# --------------------------------------------------------------------------------------------------
# Building blocks. Each has forward(x) -> (y, logdet[B]) and reverse(y) -> x.


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _reduce_dims(x: Tensor) -> list[int]:
    return list(range(1, x.dim()))


def squeeze(x: Tensor, ndim: int) -> Tensor:
    """Space-to-channel: 2x2 -> 4 channels (2-D) or 2x2x2 -> 8 channels (3-D). Volume preserving."""
    b, c = x.shape[:2]
    sp = x.shape[2:]
    if ndim == 2:
        h, w = sp
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * 4, h // 2, w // 2)
    d, h, w = sp
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * 8, d // 2, h // 2, w // 2)


def unsqueeze(x: Tensor, ndim: int) -> Tensor:
    """Inverse of :func:`squeeze`."""
    b, c = x.shape[:2]
    sp = x.shape[2:]
    if ndim == 2:
        h, w = sp
        x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, h * 2, w * 2)
    d, h, w = sp
    x = x.reshape(b, c // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // 8, d * 2, h * 2, w * 2)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + bias) * exp(logs), initialized from the first training batch.

    The ``initialized`` flag is a buffer, so it is saved with the weights and a loaded model never
    re-initializes on the data it scores. A channel whose initial variance is (numerically) zero gets
    scale 1 rather than 1/eps: dividing by a vanishing std would make the flow explode on the next,
    different input and give inf log-densities.
    """

    MIN_STD = 1e-4

    def __init__(self, channels: int, ndim: int, scale: float = 1.0):
        super().__init__()
        shape = (1, channels) + (1,) * ndim
        self.bias = nn.Parameter(torch.zeros(shape))
        self.logs = nn.Parameter(torch.zeros(shape))
        self.scale = scale
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False)
        logs = torch.where(std > self.MIN_STD, torch.log(self.scale / std.clamp_min(self.MIN_STD)), 0.0)
        self.bias.copy_(-mean)
        self.logs.copy_(logs)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(self.initialized) and self.training:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        logdet = _spatial_size(x) * self.logs.sum()
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv(nn.Module):
    """Invertible 1x1 (1x1x1) convolution, LU-parametrized: W = P L (U + diag(sign * exp(log_s))).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular. Initialized from
    a random rotation, so the flow starts volume-preserving.
    """

    def __init__(self, channels: int, ndim: int):
        super().__init__()
        self.ndim = ndim
        w0 = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        p, lower, upper = torch.linalg.lu(w0)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        kernel = w.view(*w.shape, *([1] * self.ndim))
        return F.conv2d(x, kernel) if self.ndim == 2 else F.conv3d(x, kernel)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = _spatial_size(x) * self.log_s.sum()
        return self._conv(x, self.weight()), logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        # Invert through the triangular factors (better conditioned than a general inverse).
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        eye = self.eye.to(y.dtype)
        inv_u = torch.linalg.solve_triangular(upper.to(y.dtype), eye, upper=True)
        inv_l = torch.linalg.solve_triangular(lower.to(y.dtype), eye, upper=False, unitriangular=True)
        w_inv = inv_u @ inv_l @ self.perm.to(y.dtype).T
        return self._conv(y, w_inv)


class ZeroConv(nn.Module):
    """Zero-initialized 3x3(x3) conv with a learned per-channel output scale exp(3 * logs).

    Zero init makes every coupling start as the identity-like map, which is what lets deep Glows train
    (Kingma & Dhariwal, section 3.3).
    """

    def __init__(self, cin: int, cout: int, ndim: int):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.conv = conv(cin, cout, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros((1, cout) + (1,) * ndim))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * 3.0)


class AffineCoupling(nn.Module):
    """Affine coupling: the second half of the channels is shifted and scaled by a net of the first.

    Net: conv3 -> ReLU -> conv1 -> ReLU -> zero-initialized conv3 (shift and scale logits).
    ``y_b = (x_b + shift) * scale`` with ``scale = sigmoid(h - 0.1) + 0.6`` (paper) or
    ``sigmoid(h + 2)`` (original Glow). The paper's scale lies in (0.6, 1.6): it can expand as well as
    contract, and is never close to 0, which keeps the inverse well conditioned.
    """

    def __init__(self, channels: int, width: int, ndim: int, scale_fn: str):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.ca = channels // 2
        self.cb = channels - self.ca
        self.scale_fn = scale_fn
        self.compute_dtype: torch.dtype | None = None  # set by Glow.set_precision
        self.memory_format: torch.memory_format | None = None  # set by Glow.set_channels_last
        self.net = nn.Sequential(
            conv(self.ca, width, 3, padding=1),
            nn.ReLU(),
            conv(width, width, 1),
            nn.ReLU(),
            ZeroConv(width, 2 * self.cb, ndim),
        )
        for m in list(self.net)[:3:2]:
            nn.init.normal_(m.weight, 0.0, 0.05)
            nn.init.zeros_(m.bias)

    def _net(self, xa: Tensor) -> Tensor:
        """The coupling net, in bf16 when the model's precision says so; its output back in float32.

        Only this net runs in low precision: the affine transform, the log-scales, the latents'
        log-densities and every log-determinant are computed from its float32 output in float32, so
        the likelihood stays exact for the function the net computes (the flow is still invertible
        and its log-determinant still exact; bf16 only changes *which* function the net is).
        """
        if self.memory_format is not None:
            xa = xa.contiguous(memory_format=self.memory_format)
        if self.compute_dtype is None or xa.dtype != torch.float32 or _bf16_conv_broken(xa):
            return self.net(xa)
        with torch.autocast(device_type=xa.device.type, dtype=self.compute_dtype):
            h = self.net(xa)
        return h.float()

    def _shift_scale(self, xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self._net(xa)
        shift, raw = h[:, 0::2], h[:, 1::2]
        if self.scale_fn == "paper":
            scale = torch.sigmoid(raw - 0.1) + 0.6
            log_scale = torch.log(scale)
        else:
            scale = torch.sigmoid(raw + 2.0)
            log_scale = F.logsigmoid(raw + 2.0)
        return shift, scale, log_scale

    def forward(self, x: Tensor, per_location: bool = False) -> tuple[Tensor, Tensor]:
        """(y, logdet): logdet is (B,), or (B, *spatial) summed over channels only when
        ``per_location`` (the coupling's share of the voxel map, see :meth:`Glow.log_prob_map`)."""
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, scale, log_scale = self._shift_scale(xa)
        yb = (xb + shift) * scale
        if per_location:
            return torch.cat([xa, yb], dim=1), log_scale.sum(dim=1)
        return torch.cat([xa, yb], dim=1), log_scale.sum(dim=_reduce_dims(log_scale))

    def reverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, : self.ca], y[:, self.ca :]
        shift, scale, _ = self._shift_scale(ya)
        return torch.cat([ya, yb / scale - shift], dim=1)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1x1(x1) conv -> affine coupling."""

    def __init__(self, channels: int, cfg: GlowConfig):
        super().__init__()
        self.actnorm = ActNorm(channels, cfg.ndim, cfg.actnorm_scale)
        self.invconv = InvConv(channels, cfg.ndim)
        self.coupling = AffineCoupling(channels, cfg.width, cfg.ndim, cfg.scale_fn)

    def forward(self, x: Tensor, per_location: bool = False) -> tuple[Tensor, Tensor]:
        """(y, logdet (B,)); with ``per_location`` the logdet is (B, *spatial): ActNorm and the 1x1
        conv add the same constant ``sum(logs) + sum(log|s|)`` at every location (their logdet is
        that constant times the number of locations), the coupling its channel-summed log-scale."""
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        if per_location:
            x, ld3 = self.coupling(x, per_location=True)
            const = self.actnorm.logs.sum() + self.invconv.log_s.sum()
            return x, ld3 + const.to(ld3.dtype)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def reverse(self, y: Tensor) -> Tensor:
        y = self.coupling.reverse(y)
        y = self.invconv.reverse(y)
        return self.actnorm.reverse(y)


class SplitPrior(nn.Module):
    """Optional learned prior of the factored-out half, conditioned on the kept half (off by default)."""

    def __init__(self, channels_kept: int, channels_out: int, ndim: int):
        super().__init__()
        self.conv = ZeroConv(channels_kept, 2 * channels_out, ndim)

    def forward(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(kept)
        return h[:, 0::2], h[:, 1::2]  # mean, log std


def _gaussian_logpdf(z: Tensor, mean: Tensor | None = None, logs: Tensor | None = None,
                     per_location: bool = False) -> Tensor:
    """Log-density of z, summed over everything but the batch (B,), or over channels only (B, *spatial)."""
    if mean is None or logs is None:
        lp = -0.5 * (LOG_2PI + z * z)
    else:
        lp = -0.5 * (LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))
    if per_location:
        return lp.sum(dim=1)
    return lp.sum(dim=_reduce_dims(lp))


def spread_to_voxels(level_map: Tensor, factor: int, ndim: int) -> Tensor:
    """(B, *coarse) -> (B, *coarse*factor): each location's value shared evenly by the ``factor**ndim``
    input voxels it covers, so the total is unchanged."""
    out = level_map
    for axis in range(1, ndim + 1):
        out = out.repeat_interleave(factor, dim=axis)
    return out / float(factor**ndim)


# --------------------------------------------------------------------------------------------------


class Glow(nn.Module):
    """Multi-scale Glow (2-D or 3-D). See the module docstring for the conventions."""

    def __init__(self, cfg: GlowConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList()
        self.priors = nn.ModuleList()
        factor = 4 if cfg.ndim == 2 else 8
        c = cfg.in_channels
        for level in range(cfg.levels):
            c *= factor
            self.levels.append(nn.ModuleList(FlowStep(c, cfg) for _ in range(cfg.depth)))
            if level < cfg.levels - 1:
                kept = c - c // 2
                if cfg.learn_split_prior:
                    self.priors.append(SplitPrior(kept, c // 2, cfg.ndim))
                c = kept
        self.set_precision(str(cfg.extra.get("precision", "fp32")))
        self.set_channels_last(bool(cfg.extra.get("channels_last", False)))

    # -- numerics --------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """``"fp32"`` or ``"bf16"`` (the coupling nets' compute type; recorded in the checkpoint)."""
        return str(self.cfg.extra.get("precision", "fp32"))

    def set_precision(self, precision: str) -> None:
        """Run the coupling nets in ``"bf16"`` (autocast) or ``"fp32"``; everything else stays float32.

        The choice is stored in ``cfg.extra`` so that a saved model scores the way it was trained.
        bf16 pays on CPUs with AVX512-BF16/AMX and on CUDA GPUs; elsewhere it is slower but still
        correct. See :meth:`AffineCoupling._net` for what runs in which precision.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.cfg.extra["precision"] = precision
        dtype = torch.bfloat16 if precision == "bf16" else None
        for m in self.modules():
            if isinstance(m, AffineCoupling):
                m.compute_dtype = dtype

    @property
    def channels_last(self) -> bool:
        """Whether the coupling nets run in the channels-last memory format (recorded like precision)."""
        return bool(self.cfg.extra.get("channels_last", False))

    def set_channels_last(self, enabled: bool) -> None:
        """Lay the coupling nets' convolutions out channels-last (NDHWC / NHWC), or back.

        oneDNN's CPU convolutions run several times faster on channels-last tensors than on the
        default layout at these widths (bench/glow_bench.py, ``+cl`` rows); the arithmetic is the same
        up to the order of float additions. Only a layout: the parameters keep their values, and
        ``state_dict`` loads into either layout.
        """
        self.cfg.extra["channels_last"] = bool(enabled)
        fmt = torch.channels_last_3d if self.cfg.ndim == 3 else torch.channels_last
        for m in self.modules():
            if isinstance(m, AffineCoupling):
                m.memory_format = fmt if enabled else None
                m.net.to(memory_format=fmt if enabled else torch.contiguous_format)

    # -- the flow --------------------------------------------------------------------------------
    def _encode(self, x: Tensor, level_maps: list[Tensor] | None = None
                ) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """The flow. With ``level_maps`` (an empty list) the log-determinant is kept per location:
        one (B, *spatial_i) map per level is appended (the returned logdet is then their total), for
        :meth:`log_prob_map`; without it nothing per-location is built, so ``log_prob`` is not slowed."""
        self._check_input(x)
        collect = level_maps is not None
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        zs: list[Tensor] = []
        kept: list[Tensor] = []
        h = x
        for i, steps in enumerate(self.levels):
            h = squeeze(h, self.cfg.ndim)
            level_ld = (torch.zeros((h.shape[0], *h.shape[2:]), dtype=h.dtype, device=h.device)
                        if collect else None)
            for step in steps:
                h, ld = step(h, per_location=collect)
                if level_ld is not None:
                    level_ld = level_ld + ld
                else:
                    logdet = logdet + ld
            if level_maps is not None and level_ld is not None:
                level_maps.append(level_ld)
                logdet = logdet + level_ld.sum(dim=_reduce_dims(level_ld))
            if i < len(self.levels) - 1:
                c_out = h.shape[1] // 2
                zs.append(h[:, :c_out])
                h = h[:, c_out:]
                kept.append(h)
        zs.append(h)
        return zs, logdet, kept

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x (B, C, *image_shape) -> (latents finest first / coarsest last, logdet (B,))."""
        zs, logdet, _ = self._encode(x)
        return zs, logdet

    def decode(self, zs: list[Tensor]) -> Tensor:
        """Exact inverse of :meth:`encode`."""
        if len(zs) != len(self.levels):
            raise ValueError(f"decode expects {len(self.levels)} latents, got {len(zs)}")
        return self._decode_from(0, zs)

    def _decode_from(self, level: int, zs: list[Tensor]) -> Tensor:
        """Invert levels >= ``level``; gives the input of ``level``'s squeeze (or of the flow)."""
        h = zs[-1]
        for i in reversed(range(level, len(self.levels))):
            if i < len(self.levels) - 1:
                h = torch.cat([zs[i], h], dim=1)
            for step in reversed(self.levels[i]):
                h = step.reverse(h)
            h = unsqueeze(h, self.cfg.ndim)
        return h

    def _prior_log_prob(self, zs: list[Tensor], kept: list[Tensor]) -> Tensor:
        total = _gaussian_logpdf(zs[-1])
        for i, z in enumerate(zs[:-1]):
            if self.cfg.learn_split_prior:
                mean, logs = self.priors[i](kept[i])
                total = total + _gaussian_logpdf(z, mean, logs)
            else:
                total = total + _gaussian_logpdf(z)
        return total

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats, (B,): N(0, I) log-density of the latents plus the log-determinant."""
        zs, logdet, kept = self._encode(x)
        return self._prior_log_prob(zs, kept) + logdet

    def log_prob_map(self, x: Tensor) -> Tensor:
        """log p(x) decomposed exactly over the input voxels: (B, *image_shape), summing to ``log_prob``.

        Every term of log p(x) belongs to one location of one level: the latent factored out at level
        i (and, at the last level, the rest) has its log-density summed over channels at each of that
        level's locations; each affine coupling adds its log-scale summed over channels there; ActNorm
        and the 1x1(x1) conv add the same input-independent constant at every location of their level
        (their logdet is that constant times the number of locations, so it is kept exactly, not
        dropped). A location at level i covers ``2**(i+1)`` input voxels per axis; its value is shared
        evenly by them, and the levels are summed. The map's total equals :meth:`log_prob` up to
        float round-off, with no constant left out. (The flow's data space is already the dequantized
        ``x/2**n - 0.5`` of :meth:`preprocess`, so there is no further preprocessing constant.)

        Why: the paper's score is a sum over ~500,000 voxels whose modelling noise adds up against a
        lesion of a few hundred; the map lets a score look at lesion-sized windows instead
        (:mod:`triage.model.voxelmap`). The receptive field of a coarse location is wide, so the map
        localizes to a level's location size, not to the voxel.
        """
        return self.log_prob_level_maps(x).sum(dim=1)

    def log_prob_level_maps(self, x: Tensor) -> Tensor:
        """:meth:`log_prob_map` kept per level: (B, levels, *image_shape), finest level first; the sum
        over levels is the voxel map. Why separately: the finest level has by far the most locations
        and the largest variance over normals, the coarsest the widest context, so a region score
        that adds them raw is dominated by the finest level's noise; standardized per level, each
        scale counts in units of its own normal variability (as CFlow-AD normalizes each scale)."""
        level_maps: list[Tensor] = []
        zs, _, kept = self._encode(x, level_maps)
        nd = self.cfg.ndim
        parts: list[Tensor] = []
        for i, lvl in enumerate(level_maps):
            if i < len(level_maps) - 1:
                if self.cfg.learn_split_prior:
                    mean, logs = self.priors[i](kept[i])
                    lp = _gaussian_logpdf(zs[i], mean, logs, per_location=True)
                else:
                    lp = _gaussian_logpdf(zs[i], per_location=True)
            else:
                lp = _gaussian_logpdf(zs[-1], per_location=True)
            parts.append(spread_to_voxels(lvl + lp, 2 ** (i + 1), nd))
        return torch.stack(parts, dim=1)

    # -- discrete data ---------------------------------------------------------------------------
    def preprocess(self, x_uint: Tensor, n_bits: int | None = None, noise: bool = False) -> Tensor:
        """Integers in [0, 2**n_bits) -> flow space x/2**n - 0.5, dequantized.

        ``noise=True`` (training) adds U(0, 1) within the bin; ``noise=False`` (scoring) takes the bin's
        midpoint, so a score is a deterministic function of the volume.
        """
        n_bits = self.cfg.n_bits if n_bits is None else n_bits
        bins = float(2**n_bits)
        x = x_uint.to(next(self.parameters()).dtype)
        x = x.clamp(0, bins - 1)
        u = torch.rand_like(x) if noise else torch.full_like(x, 0.5)
        return (x + u) / bins - 0.5

    def bits_per_dim(self, x_uint: Tensor, n_bits: int | None = None, noise: bool = False) -> Tensor:
        """Negative log-likelihood of discrete data in bits per dimension, (B,).

        A bin of width 1/2**n in flow space has probability ~ p(x) * (1/2**n)**D, hence the
        ``+ n_bits`` term (the discretization correction of Dinh et al. / Kingma & Dhariwal).
        """
        n_bits = self.cfg.n_bits if n_bits is None else n_bits
        x = self.preprocess(x_uint, n_bits, noise=noise)
        lp = self.log_prob(x)
        d = math.prod(x.shape[1:])
        return -lp / (d * math.log(2.0)) + n_bits

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, generator: torch.Generator | None = None) -> Tensor:
        """Draw n samples in flow space (x/2**n - 0.5); temperature scales the latent std."""
        device = next(self.parameters()).device
        dtype = next(self.parameters()).dtype
        shapes = self.latent_shapes(n)
        zs = [torch.randn(s, generator=generator, dtype=dtype).to(device) * temperature for s in shapes]
        if self.cfg.learn_split_prior:
            for i in reversed(range(len(shapes) - 1)):
                # the kept half at level i is the input of level i+1, before its squeeze
                mean, logs = self.priors[i](self._decode_from(i + 1, zs))
                zs[i] = mean + torch.exp(logs) * zs[i]
        return self.decode(zs)

    def to_uint(self, x: Tensor, n_bits: int | None = None) -> Tensor:
        """Flow space -> integers in [0, 2**n_bits) (for writing samples as volumes)."""
        n_bits = self.cfg.n_bits if n_bits is None else n_bits
        bins = 2**n_bits
        return torch.clamp(torch.floor((x + 0.5) * bins), 0, bins - 1).to(torch.uint8)

    def latent_shapes(self, batch: int) -> list[tuple[int, ...]]:
        factor = 4 if self.cfg.ndim == 2 else 8
        c = self.cfg.in_channels
        sp = list(self.cfg.image_shape)
        shapes: list[tuple[int, ...]] = []
        for level in range(self.cfg.levels):
            c *= factor
            sp = [s // 2 for s in sp]
            if level < self.cfg.levels - 1:
                shapes.append((batch, c // 2, *sp))
                c -= c // 2
        shapes.append((batch, c, *sp))
        return shapes

    def mark_initialized(self) -> None:
        """Declare every ActNorm initialized (keeps its current parameters)."""
        for m in self.modules():
            if isinstance(m, ActNorm):
                m.initialized.fill_(True)

    def _check_input(self, x: Tensor) -> None:
        want = (self.cfg.in_channels, *self.cfg.image_shape)
        if x.dim() != self.cfg.ndim + 2 or tuple(x.shape[1:]) != want:
            raise ValueError(f"Glow expects input (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Weights and config in one file, loadable with ``torch.load(weights_only=True)``."""
        cfg = asdict(self.cfg)
        cfg["image_shape"] = list(cfg["image_shape"])
        payload = {
            "format": "glowtriage.glow/1",
            "config": cfg,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "extra": extra or {},
        }
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Glow:
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != "glowtriage.glow/1":
            raise ValueError(f"{path}: not a glowtriage Glow checkpoint")
        known = {f.name for f in fields(GlowConfig)}
        cfg = GlowConfig(**{k: v for k, v in payload["config"].items() if k in known})
        model = cls(cfg)
        model.load_state_dict(payload["state_dict"])
        model.extra_info = payload.get("extra", {})  # type: ignore[attr-defined]
        return model


def fit_to_shape(volume: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """Block-average integer volumes (..., *canonical) down to a preset's smaller shape, re-rounded.

    The canonical volume is 32x128x128; small presets (cpu-small) work at 32x64x64. Averaging whole
    blocks and rounding keeps the data on the 7-bit lattice the discrete likelihood assumes, and is
    the same code for training and scoring.
    """
    sp = tuple(volume.shape[-len(image_shape) :])
    if sp == tuple(image_shape):
        return volume
    factors = []
    for s, t in zip(sp, image_shape, strict=True):
        if s % t:
            raise ValueError(
                f"cannot reduce volume shape {sp} to {tuple(image_shape)}: not an integer factor"
            )
        factors.append(s // t)
    lead = volume.shape[: volume.dim() - len(image_shape)]
    x = volume.reshape(-1, 1, *sp).float()
    pool = F.avg_pool2d if len(image_shape) == 2 else F.avg_pool3d
    y = pool(x, kernel_size=tuple(factors), stride=tuple(factors))
    return torch.round(y).to(volume.dtype).reshape(*lead, *image_shape)
