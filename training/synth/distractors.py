"""Series a PACS sends alongside the one we want: localizer, bone reconstruction, thin series,
coronal reformat and a dose screenshot.  A consumer must recognise and skip them.

Why apart: they share one random stream (drawn in a fixed order, so a dataset is reproducible) and
the acquisition of the primary series; the bone reconstruction doubles as the pattern "bone_twin"
(a sharp reconstruction whose kernel and description are in no list the consumer knows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.synth.basics import SC_IMAGE_STORAGE
from training.synth.dicom import _ct_image, _new_dataset, _save, _Series, _Study
from training.synth.geometry import Stack
from training.synth.phantom import Phantom
from training.synth.render import _blur, _r, _render, _soft_noise, _to_raw
from training.synth.vendors import _Vendor

NewSeries = Callable[[str, str, str, list[str], tuple[float, float]], _Series]


@dataclass
class Names:
    """Descriptions and kernels of the distractor series (vendor defaults, or a pattern's)."""

    localizer: str
    bone: str
    bone_kernel: str
    thin: str
    soft_kernel: str
    reformat: str


def sharp_reconstruction(clean: np.ndarray, rng: np.random.Generator, noise_sigma: float) -> np.ndarray:
    """A bone/sharp kernel's image of the same acquisition: unsharp-mask boost and 3.5x white noise."""
    return clean + 0.9 * (clean - _blur(clean)) + rng.standard_normal(clean.shape, dtype=np.float32) * (
        np.float32(max(noise_sigma, 1e-3) * 3.5)
    )


def write_bone(
    study: _Study, new_series: NewSeries, rng: np.random.Generator, stack: Stack, clean: np.ndarray,
    *, description: str, kernel: str, noise_sigma: float,
) -> _Series:  # fmt: skip
    """Bone-kernel reconstruction of the same acquisition: same planes, sharp kernel, more noise."""
    bone = new_series("bone", description, kernel, ["ORIGINAL", "PRIMARY", "AXIAL"], (500.0, 2000.0))
    raw_b = _to_raw(sharp_reconstruction(clean, rng, noise_sigma), study.signed)
    bone_desc = study.vendor.superior_first
    n = len(stack)
    for k in range(n):
        number = n - k if bone_desc else k + 1
        ds = _ct_image(
            study, bone, instance=number, raw=raw_b[k], ipp=list(stack.ipps[k]), iop=stack.iop, ps=stack.ps,
            thickness=stack.thicknesses[k], spacing=stack.spacings[k], tilt=stack.tilt,
            slice_location=float(stack.centres[k][2]),
        )  # fmt: skip
        _save(ds, bone, number)
    return bone


def write_distractors(
    study: _Study, ph: Phantom, vendor: _Vendor, new_series: NewSeries, rng: np.random.Generator,
    *, clean: np.ndarray, stack: Stack, names: Names, noise_sigma: float, fov: float,
) -> None:  # fmt: skip
    """Localizer, bone, thin, reformat and dose series, drawing from ``rng`` in this fixed order."""
    _write_localizer(study, ph, vendor, new_series, rng, names.localizer)
    write_bone(study, new_series, rng, stack, clean, description=names.bone, kernel=names.bone_kernel,
               noise_sigma=noise_sigma)  # fmt: skip
    _write_thin(study, ph, vendor, new_series, rng, stack, names, noise_sigma, fov)
    _write_reformat(study, ph, vendor, new_series, rng, names, noise_sigma, fov)
    _write_dose(study, new_series, rng)


def _write_localizer(
    study: _Study, ph: Phantom, vendor: _Vendor, new_series: NewSeries, rng: np.random.Generator, desc: str
) -> None:
    """Projection radiograph(s) of the phantom on a coarse grid, upsampled to 512."""
    loc = new_series("localizer", desc, "T20s" if vendor.key == "siemens" else "",
                     ["ORIGINAL", "PRIMARY", "LOCALIZER"], (300.0, 1200.0))  # fmt: skip
    span = 320.0
    g = 4.0
    cz = float(ph.center[2]) - 40.0
    xs = np.arange(-100.0, 100.0 + 1e-6, g) + float(ph.center[0])
    ys = np.arange(-span / 2, span / 2 + 1e-6, g)
    zs = np.arange(span / 2, -span / 2 - 1e-6, -g) + cz  # top (superior) first
    zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    hu3 = ph.sample(np.stack([xx, yy, zz], -1))[0].reshape(len(zs), len(ys), len(xs))
    mu = np.clip(1.0 + hu3 / 1000.0, 0, None) * 0.019 * g
    n_views = 1 + int(rng.random() < 0.5)
    views = [(mu.sum(axis=2), [0.0, 1.0, 0.0, 0.0, 0.0, -1.0])]  # lateral: rows down z, cols along +y
    if n_views == 2:
        views.append((mu.sum(axis=1), [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]))  # AP
    lps = span / 512.0
    for j, (proj, liop) in enumerate(views):
        tgt = np.linspace(0, proj.shape[0] - 1, 512)
        src = np.arange(proj.shape[0])
        tmp = np.stack([np.interp(tgt, src, proj[:, c]) for c in range(proj.shape[1])], 1)
        tgt2 = np.linspace(0, proj.shape[1] - 1, 512)
        img = np.stack([np.interp(tgt2, np.arange(proj.shape[1]), row) for row in tmp], 0)
        img = img * 350.0 + rng.normal(0, 6.0, img.shape) - 1024.0
        lr, lc = np.asarray(liop[:3]), np.asarray(liop[3:])
        origin = np.array([float(ph.center[0]), 0.0, cz]) - (span / 2) * lr - (span / 2) * lc
        ds = _ct_image(
            study, loc, instance=j + 1, raw=_to_raw(img, study.signed), ipp=_r(origin), iop=liop,
            ps=(lps, lps), thickness=0.6, spacing=None, tilt=0.0, slice_location=0.0,
        )  # fmt: skip
        _save(ds, loc, j + 1)


def _write_thin(
    study: _Study, ph: Phantom, vendor: _Vendor, new_series: NewSeries, rng: np.random.Generator,
    stack: Stack, names: Names, noise_sigma: float, fov: float,
) -> None:  # fmt: skip
    """Thin-slice soft series through the middle of the brain at 256 matrix (kept small on purpose)."""
    tthk = vendor.thin_thickness
    tps = (fov / 256.0, fov / 256.0)
    t_iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ti = np.asarray(t_iop)
    n_thin = 24
    z0 = float(ph.center[2]) - (n_thin - 1) / 2.0 * tthk
    half = 127.5 * tps[1] * ti[:3] + 127.5 * tps[0] * ti[3:]
    t_ipps = [np.asarray(_r(np.array([0.0, 0.0, z0 + k * tthk]) - half)) for k in range(n_thin)]
    thin_img, _ = _render(ph, t_ipps, ti, tps, 256, 256, tthk, 1)
    thin_img += _soft_noise(rng, thin_img.shape, noise_sigma * math.sqrt(stack.thickness / tthk) * 0.8)
    thin = new_series("thin", names.thin, names.soft_kernel, ["ORIGINAL", "PRIMARY", "AXIAL"],
                      vendor.soft_window)  # fmt: skip
    raw_t = _to_raw(thin_img, study.signed)
    for k in range(n_thin):
        ds = _ct_image(
            study, thin, instance=k + 1, raw=raw_t[k], ipp=list(t_ipps[k]), iop=t_iop, ps=tps,
            thickness=tthk, spacing=tthk, tilt=0.0, slice_location=float(t_ipps[k][2]),
        )  # fmt: skip
        _save(ds, thin, k + 1)


def _write_reformat(
    study: _Study, ph: Phantom, vendor: _Vendor, new_series: NewSeries, rng: np.random.Generator,
    names: Names, noise_sigma: float, fov: float,
) -> None:  # fmt: skip
    """Coronal reformat (derived): 12 planes 8 mm apart through the head."""
    tps = (fov / 256.0, fov / 256.0)
    c_iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ci = np.asarray(c_iop)
    n_cor = 12
    zc = float(ph.center[2]) + 10.0
    c_ipps = []
    for k in range(n_cor):
        y = float(ph.center[1]) + (k - (n_cor - 1) / 2.0) * 8.0
        centre = np.array([0.0, y, zc])
        c_ipps.append(np.asarray(_r(centre - 127.5 * tps[1] * ci[:3] - 127.5 * tps[0] * ci[3:])))
    cor_img, _ = _render(ph, c_ipps, ci, tps, 256, 256, 3.0, 1)
    cor_img += _soft_noise(rng, cor_img.shape, noise_sigma)
    ref = new_series("reformat", names.reformat, names.soft_kernel, list(vendor.reformat_type),
                     vendor.soft_window)  # fmt: skip
    raw_c = _to_raw(cor_img, study.signed)
    for k in range(n_cor):
        ds = _ct_image(
            study, ref, instance=k + 1, raw=raw_c[k], ipp=list(c_ipps[k]), iop=c_iop, ps=tps, thickness=3.0,
            spacing=8.0, tilt=0.0, slice_location=float(c_ipps[k][1]),
        )  # fmt: skip
        _save(ds, ref, k + 1)


def _write_dose(study: _Study, new_series: NewSeries, rng: np.random.Generator) -> None:
    """Dose report: a Secondary Capture "screenshot" with block glyphs standing in for text."""
    dose = new_series("dose", "Dose Report", "", ["DERIVED", "SECONDARY", "OTHER"], (128.0, 256.0))
    ds = _new_dataset(study, dose, SC_IMAGE_STORAGE, 1)
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    img = np.zeros((512, 512), np.uint8)
    img[40:44, 30:480] = 200
    for line in range(12):
        y0 = 70 + line * 30
        x = 30
        while x < 470:
            wdt = int(rng.integers(4, 12))
            if rng.random() < 0.8:
                img[y0:y0 + 12, x:x + wdt] = 230
            x += wdt + 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    _save(ds, dose, 1)
