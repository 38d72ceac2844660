"""Numerical checks of the Glow flow against brute force (inverse, log-determinant, likelihood)."""

from __future__ import annotations

import math

import pytest
import torch

from training.presets import config_from_preset, glow_from_preset, load_presets
from triage.model.glow import ActNorm, Glow, GlowConfig, fit_to_shape

SHAPES = {2: (8, 8), 3: (4, 4, 4)}  # 64 dimensions each, 2 levels of squeeze


def make(ndim: int, dtype=torch.float64, levels: int = 2, depth: int = 2, width: int = 8, **kw) -> Glow:
    torch.manual_seed(1234 + ndim)
    shape = kw.pop("shape", SHAPES[ndim])
    model = Glow(GlowConfig(ndim=ndim, image_shape=shape, levels=levels, depth=depth, width=width, **kw))
    return model.to(dtype)


def randomize(model: Glow, scale: float = 0.1) -> None:
    """Move every parameter off its initial value (zero convs included) so no layer is an identity.

    0.1 keeps the random 1x1 convs at condition numbers ~20: float32 round-off in a deeper stack of
    random (untrained) layers grows with the conditioning, not with any error in the inverse.
    """
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    model.mark_initialized()


def init_actnorm(model: Glow, x: torch.Tensor) -> None:
    model.train()
    model.log_prob(x)
    model.eval()


def sample_input(ndim: int, b: int = 3, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.rand((b, 1, *SHAPES[ndim]), generator=g, dtype=dtype) - 0.5


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.float64, 1e-9)])
@pytest.mark.parametrize("randomized", [False, True])
def test_decode_inverts_encode(ndim: int, dtype: torch.dtype, tol: float, randomized: bool) -> None:
    model = make(ndim, dtype)
    x = sample_input(ndim, dtype=dtype)
    init_actnorm(model, x)
    if randomized:
        randomize(model)
    model.eval()
    with torch.no_grad():
        zs, _ = model.encode(x)
        back = model.decode(zs)
    assert back.dtype == dtype
    assert (back - x).abs().max().item() < tol
    # not a trivial identity: the latents differ from the input
    flat = torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)
    assert flat.shape[1] == x[0].numel()
    if randomized:
        assert (flat.sort(dim=1).values - x.reshape(3, -1).sort(dim=1).values).abs().max() > 1e-2


def _brute_logdet(model: Glow, x: torch.Tensor) -> float:
    def f(v: torch.Tensor) -> torch.Tensor:
        zs, _ = model.encode(v.reshape(1, *x.shape[1:]))
        return torch.cat([z.reshape(-1) for z in zs])

    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign.item() != 0
    return logabs.item()


@pytest.mark.parametrize(
    ("ndim", "shape"), [(2, (8, 8)), (2, (16, 16)), (3, (4, 4, 4)), (3, (4, 8, 8))]
)
@pytest.mark.parametrize("actnorm_initialized", [False, True])
def test_logdet_matches_bruteforce_jacobian(ndim, shape, actnorm_initialized: bool) -> None:
    model = make(ndim, shape=shape)
    g = torch.Generator().manual_seed(5)
    x = torch.rand((4, 1, *shape), generator=g, dtype=torch.float64) - 0.5
    if actnorm_initialized:
        init_actnorm(model, x)
        # a further perturbation so couplings are not near-identity
        randomize(model, scale=0.1)
    model.eval()
    dims = x[0].numel()
    assert 64 <= dims <= 256
    for i in range(2):
        xi = x[i : i + 1]
        _, logdet = model.encode(xi)
        brute = _brute_logdet(model, xi)
        assert math.isfinite(brute)
        assert abs(logdet.item() - brute) <= 1e-3 * max(1.0, abs(brute)), (logdet.item(), brute)


@pytest.mark.parametrize("scale_fn", ["paper", "glow"])
def test_logdet_bruteforce_both_scale_functions_and_split_prior(scale_fn: str) -> None:
    model = make(2, scale_fn=scale_fn, learn_split_prior=True)
    randomize(model, 0.1)
    x = sample_input(2, b=1)
    _, logdet = model.encode(x)
    assert abs(logdet.item() - _brute_logdet(model, x)) < 1e-6 * max(1.0, abs(logdet.item()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_log_prob_is_standard_normal_density_plus_logdet(ndim: int) -> None:
    model = make(ndim)
    x = sample_input(ndim)
    init_actnorm(model, x)
    randomize(model)
    zs, logdet = model.encode(x)
    flat = torch.cat([z.reshape(z.shape[0], -1) for z in zs], dim=1)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(flat).sum(dim=1)
    assert torch.allclose(model.log_prob(x), normal + logdet, rtol=0, atol=1e-9)


def test_split_prior_log_prob_and_sampling_are_consistent() -> None:
    model = make(2, learn_split_prior=True)
    randomize(model)
    x = sample_input(2)
    zs, logdet = model.encode(x)
    # the factored-out half at level 0 is scored against the prior computed from the kept half
    kept = model._decode_from(1, zs)
    mean, logs = model.priors[0](kept)
    expect = (
        torch.distributions.Normal(mean, logs.exp()).log_prob(zs[0]).flatten(1).sum(1)
        + torch.distributions.Normal(0.0, 1.0).log_prob(zs[1]).flatten(1).sum(1)
    )
    assert torch.allclose(model.log_prob(x), expect + logdet, atol=1e-9)
    s = model.sample(4, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (4, 1, 8, 8) and torch.isfinite(s).all()


@pytest.mark.parametrize("ndim", [2, 3])
def test_actnorm_data_dependent_init(ndim: int) -> None:
    layer = ActNorm(5, ndim).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn((6, 5, *([4] * ndim)), generator=g, dtype=torch.float64) * 3.0 + 2.0
    x[:, 2] = 0.7  # a channel with zero variance: must not produce inf or NaN
    layer.train()
    y, logdet = layer(x)
    dims = [0, *range(2, x.dim())]
    assert bool(layer.initialized)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    mean = y.mean(dim=dims)
    std = y.std(dim=dims, unbiased=False)
    live = [0, 1, 3, 4]
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-9)
    assert torch.allclose(std[live], torch.ones(4, dtype=torch.float64), atol=1e-9)
    assert std[2].item() == 0.0 and layer.logs[0, 2].abs().max().item() == 0.0
    # a second batch does not re-initialize
    before = layer.logs.detach().clone()
    layer(x * 5)
    assert torch.equal(before, layer.logs.detach())
    # the flag travels with the weights
    assert "initialized" in layer.state_dict()


def test_uninitialized_actnorm_in_eval_is_identity_and_scoring_is_deterministic() -> None:
    model = make(3, torch.float32)
    model.eval()
    x = torch.randint(0, 128, (2, 1, 4, 4, 4))
    a = model.bits_per_dim(x)
    b = model.bits_per_dim(x)
    assert torch.equal(a, b)
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))


def test_save_load_gives_identical_log_prob(tmp_path) -> None:
    model = make(3, torch.float32)
    x = sample_input(3, dtype=torch.float32)
    init_actnorm(model, x)
    randomize(model)
    path = tmp_path / "m.pt"
    model.save(path, extra={"role": "normal"})
    raw = torch.load(path, weights_only=True)  # must load without pickle code execution
    assert raw["format"] == "glowtriage.glow/1"
    loaded = Glow.load(path)
    loaded.eval()
    model.eval()
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert all(bool(m.initialized) for m in loaded.modules() if isinstance(m, ActNorm))


def test_bits_per_dim_matches_log_prob_and_discretization() -> None:
    model = make(2)
    x_uint = torch.randint(0, 128, (3, 1, 8, 8))
    x = (x_uint.double() + 0.5) / 128 - 0.5
    expect = -model.log_prob(x) / (64 * math.log(2)) + 7
    assert torch.allclose(model.bits_per_dim(x_uint, 7), expect, atol=1e-12)
    noisy = model.preprocess(x_uint, 7, noise=True)
    assert ((noisy + 0.5) * 128 - x_uint).min() >= 0 and ((noisy + 0.5) * 128 - x_uint).max() < 1


def _toy(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Two 7-bit toy 'image' distributions on 8x8: a bright blob vs. vertical stripes."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    if kind == "blob":
        cy = 3.5 + torch.randn(n, 1, 1, generator=g)
        cx = 3.5 + torch.randn(n, 1, 1, generator=g)
        img = 100 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0) + 10
    else:
        phase = torch.rand(n, 1, 1, generator=g) * 6.28
        img = 60 + 50 * torch.sin(xx * 1.6 + phase) + 0 * yy
    img = img + torch.randn(img.shape, generator=g) * 3
    return img.round().clamp(0, 127).reshape(n, 1, 8, 8)


def test_training_lowers_nll_and_separates_distributions() -> None:
    torch.manual_seed(0)
    model = Glow(GlowConfig(ndim=2, image_shape=(8, 8), levels=2, depth=3, width=32))
    g = torch.Generator().manual_seed(1)
    train = _toy("blob", 512, g)
    held_out = _toy("blob", 64, g)
    other = _toy("stripes", 64, g)
    model.eval()
    with torch.no_grad():
        model.train()
        model.bits_per_dim(train[:128], noise=True)  # ActNorm data-dependent init
        model.eval()
        start = model.bits_per_dim(held_out).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(300):
        batch = train[torch.randint(0, 512, (64,), generator=g)]
        loss = model.bits_per_dim(batch, noise=True).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item()), step
    model.eval()
    with torch.no_grad():
        end = model.bits_per_dim(held_out).mean().item()
        lp_in = model.log_prob(model.preprocess(held_out)).mean().item()
        lp_out = model.log_prob(model.preprocess(other)).mean().item()
    assert end < start - 1.0, (start, end)
    assert lp_in > lp_out


EXTREMES = {
    "zeros": lambda s: torch.zeros(s, dtype=torch.long),
    "max": lambda s: torch.full(s, 127, dtype=torch.long),
    "constant": lambda s: torch.full(s, 42, dtype=torch.long),
    "half": lambda s: torch.cat([torch.zeros(s)[: s[0] // 2], torch.full(s, 127.0)[s[0] // 2 :]]).long(),
}


@pytest.mark.parametrize("kind", sorted(EXTREMES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_no_nan_or_inf_on_degenerate_inputs(kind: str, ndim: int) -> None:
    model = make(ndim, torch.float32)
    x_uint = EXTREMES[kind]((4, 1, *SHAPES[ndim]))
    model.train()
    bpd_train = model.bits_per_dim(x_uint, noise=False)  # ActNorm init on a degenerate batch
    model.eval()
    x = model.preprocess(x_uint)
    zs, logdet = model.encode(x)
    outs = [bpd_train, model.bits_per_dim(x_uint), model.log_prob(x), logdet, model.decode(zs), *zs]
    outs.append(model.sample(2, temperature=1.0))
    for t in outs:
        assert torch.isfinite(t).all()
    assert (model.decode(zs) - x).abs().max() < 1e-4
    assert model.to_uint(model.decode(zs)).eq(x_uint.to(torch.uint8)).all()


def test_presets_are_consistent() -> None:
    presets = load_presets()
    assert {"paper-bct", "paper-cxr", "cpu-small", "test-tiny"} <= set(presets)
    bct = config_from_preset("paper-bct")
    assert (bct.ndim, bct.image_shape, bct.levels, bct.depth, bct.width) == (3, (32, 128, 128), 4, 32, 512)
    assert bct.extra["batch_size"] == 1 and bct.extra["lr"] == 1e-4 and bct.scale_fn == "paper"
    cxr = config_from_preset("paper-cxr")
    assert (cxr.ndim, cxr.image_shape, cxr.levels, cxr.depth, cxr.width) == (2, (512, 512), 7, 32, 512)
    assert cxr.extra["batch_size"] == 128 and cxr.extra["lr"] == 1e-3
    tiny = glow_from_preset("test-tiny")
    x = torch.randint(0, 128, (2, 1, *tiny.cfg.image_shape))
    assert torch.isfinite(tiny.bits_per_dim(x)).all()
    with pytest.raises(KeyError, match="unknown preset"):
        config_from_preset("nope")


def test_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GlowConfig(ndim=3, image_shape=(6, 8, 8), levels=2, depth=1, width=4)
    with pytest.raises(ValueError, match="ndim"):
        GlowConfig(ndim=3, image_shape=(8, 8), levels=1, depth=1, width=4)
    model = make(2)
    with pytest.raises(ValueError, match="expects input"):
        model.encode(torch.zeros(1, 1, 4, 4, dtype=torch.float64))


def test_fit_to_shape_block_averages_on_the_lattice() -> None:
    vol = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 4, 8, 8) % 128
    vol = vol.to(torch.uint8)
    out = fit_to_shape(vol, (4, 4, 4))
    assert out.shape == (1, 4, 4, 4) and out.dtype == torch.uint8
    expect = vol.float().reshape(1, 4, 4, 2, 4, 2).mean(dim=(3, 5)).round()
    assert torch.equal(out.float(), expect)
    assert fit_to_shape(vol, (4, 8, 8)) is vol
    with pytest.raises(ValueError, match="integer factor"):
        fit_to_shape(vol, (4, 3, 3))


# -- the voxel decomposition of log p(x) ------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scale_fn", ["paper", "glow"])
@pytest.mark.parametrize("split_prior", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_map_sums_to_log_prob(ndim: int, scale_fn: str, split_prior: bool,
                                       dtype: torch.dtype) -> None:
    """The map keeps every term of log p(x) (ActNorm and 1x1 conv constants included): its total is
    log_prob, for both scale functions, 2-D and 3-D, with and without the learned split prior."""
    shape = (16, 16) if ndim == 2 else (8, 8, 8)
    model = make(ndim, dtype, levels=3, scale_fn=scale_fn, learn_split_prior=split_prior, shape=shape)
    g = torch.Generator().manual_seed(5)
    x = torch.rand((2, 1, *shape), generator=g, dtype=dtype) - 0.5
    init_actnorm(model, x)
    randomize(model)
    with torch.no_grad():
        lp = model.log_prob(x)
        m = model.log_prob_map(x)
    assert m.shape == (2, *shape)
    total = m.double().sum(dim=tuple(range(1, m.dim())))
    assert torch.allclose(total, lp.double(), rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0.0)
    with torch.no_grad():
        per_level = model.log_prob_level_maps(x)
    assert per_level.shape == (2, 3, *shape)  # one map per level, finest first
    assert torch.allclose(per_level.sum(dim=1), m, rtol=0.0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    # the coarsest level's share is constant over each of its locations (2**3 voxels per axis)
    block = per_level[0, 2][tuple([slice(0, 8)] * ndim)]
    assert torch.allclose(block, block.flatten()[0].expand_as(block))


@pytest.mark.parametrize("ndim", [2, 3])
def test_log_prob_map_is_local(ndim: int) -> None:
    """A change in one corner of the input moves the map mostly near it: the decomposition follows
    where the input changed, not the volume as a whole (what a region score relies on)."""
    shape = (32, 32) if ndim == 2 else (16, 16, 16)
    model = make(ndim, torch.float64, levels=2, shape=shape)
    g = torch.Generator().manual_seed(11)
    x = (torch.rand((1, 1, *shape), generator=g, dtype=torch.float64) - 0.5) * 0.2
    init_actnorm(model, x)
    randomize(model, 0.05)
    y = x.clone()
    corner = (slice(None), slice(None), *([slice(0, 4)] * ndim))
    y[corner] += 0.4
    with torch.no_grad():
        diff = (model.log_prob_map(y) - model.log_prob_map(x)).abs()[0]
    near = diff[tuple([slice(0, shape[0] // 2)] * ndim)].sum()
    assert float(near / diff.sum()) > 0.8
