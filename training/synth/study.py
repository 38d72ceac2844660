"""One synthetic study: a primary axial soft-tissue series, its hard cases and patterns, distractors.

Why: this is what a PACS sends for one head CT, with exact ground truth (:class:`StudyTruth`).
:func:`write_study` runs in named steps: draw everything random up front (:func:`_draw`), pick the
patterns, the subject and the scanner, plan the primary stack (``geometry``), render it, write it
(per-file, or one Enhanced CT instance), write the distractors, and record the truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from training.synth.basics import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, _jsonable
from training.synth.cylinder import CylinderPhantom, make_cylinder
from training.synth.dicom import _available_syntaxes, _ct_image, _save, _Series, _Study, _uid
from training.synth.distractors import Names, write_bone, write_distractors
from training.synth.enhanced import write_enhanced
from training.synth.geometry import Stack, plan_cylinder, plan_standard, plan_thin, plan_two_stack
from training.synth.lesions import _parse_lesion
from training.synth.phantom import Phantom, make_phantom
from training.synth.render import _r, _render, _soft_noise, _to_raw
from training.synth.truth import PATTERNS, StudyTruth, SynthOptions
from training.synth.vendors import (
    _VENDORS,
    NO_HEAD_DISTRACTOR_DESCRIPTIONS,
    NO_HEAD_SERIES_FORMATS,
    NO_HEAD_STUDY_DESCRIPTIONS,
    UNLISTED_KERNELS,
    _Vendor,
)

__all__ = ["write_study"]


@dataclass
class _Draws:
    """Every random value a study needs, drawn up front in a fixed order whatever the options."""

    token: int
    phantom_seed: int
    scan_seed: int
    noise_seed: int
    case_seed: int
    distr_seed: int
    u_tilt: float
    u_shear: float
    u_rev: float
    u_miss: float
    u_comp: float
    u_mixed: float
    u_matrix: float
    tilt_angle: float
    miss_pos: float
    comp_pick: float
    u_patterns: dict[str, float]  # one uniform per member of PATTERNS
    pattern_picks: dict[str, int]  # which description/kernel a pattern uses
    twin_seed: int


def _draw(rng: np.random.Generator, options: SynthOptions) -> _Draws:
    seeds = [int(x) for x in rng.integers(0, 2**63 - 1, size=6)]
    cases = np.random.default_rng(seeds[4])
    # Hard-case draws: always all of them, in a fixed order (see SynthOptions).
    u = [float(x) for x in cases.random(7)]
    tilt_angle = float(cases.uniform(*options.tilt_range_deg))
    miss_pos = float(cases.random())
    comp_pick = float(cases.random())
    # Issue 11's patterns: drawn after the older draws, so those are unchanged.
    u_patterns = dict(zip(PATTERNS, (float(x) for x in cases.random(len(PATTERNS))), strict=True))
    picks = {name: int(x) for name, x in zip(
        ("study_desc", "series_fmt", "bone_desc", "thin_desc", "reformat_desc", "twin_soft", "twin_sharp",
         "twin_desc"), cases.integers(0, 1 << 30, size=8), strict=True)}  # fmt: skip
    twin_seed = int(cases.integers(0, 2**63 - 1))
    return _Draws(*seeds, *u, tilt_angle, miss_pos, comp_pick, u_patterns, picks, twin_seed)  # type: ignore[arg-type]


def _patterns(dr: _Draws, options: SynthOptions, pattern: str | Iterable[str] | None, kind: str) -> list[str]:
    """The patterns this study carries: drawn from the fractions, or forced by ``pattern``/``kind``.

    A phantom takes no acquisition pattern but the words; "thin" wins over "two_stack".
    """
    forced = {pattern} if isinstance(pattern, str) else set(pattern or ())
    if kind == "phantom":
        forced.add("phantom")
    elif kind != "head":
        raise ValueError(f"kind must be 'head' or 'phantom', got {kind!r}")
    unknown = sorted(forced - set(PATTERNS))
    if unknown:
        raise ValueError(f"unknown patterns {unknown}; choose from {PATTERNS}")
    chosen = {p for p in PATTERNS if p in forced or dr.u_patterns[p] < getattr(options, f"{p}_fraction")}
    if "phantom" in chosen:
        chosen &= {"phantom", "no_head_words"}
    if "thin" in chosen:
        chosen.discard("two_stack")
    return [p for p in PATTERNS if p in chosen]


def _scanner(
    sc: np.random.Generator, options: SynthOptions, ph: Phantom | CylinderPhantom, token: int,
    patient_index: int,
) -> _Study:  # fmt: skip
    """Vendor, patient, dates and UIDs; draws from ``sc`` in a fixed order."""
    vendor_keys = list(options.vendors) if options.vendors else list(_VENDORS)
    unknown = sorted(set(vendor_keys) - set(_VENDORS))
    if unknown:
        raise ValueError(f"unknown vendors {unknown}; choose from {sorted(_VENDORS)}")
    vkey = vendor_keys[int(sc.integers(len(vendor_keys)))]
    vendor = _VENDORS[vkey]
    year_day = int(sc.integers(0, 6 * 365))
    study_date = np.datetime64("2019-01-01") + np.timedelta64(year_day, "D")
    age_years = int(ph.age)
    birth = study_date - np.timedelta64(round(ph.age * 365.25), "D")
    hh, mm, ss = int(sc.integers(0, 24)), int(sc.integers(0, 60)), int(sc.integers(0, 60))
    study = _Study(
        token=token,
        vendor=vendor,
        manufacturer=str(sc.choice(vendor.manufacturers)),
        model=str(sc.choice(vendor.models)),
        patient_name=f"SYNTH^P{patient_index:04d}",
        patient_id=f"SYNP{patient_index:04d}-{token % 65536:04X}",
        birth_date=str(birth).replace("-", ""),
        sex=ph.meta.get("sex", "O"),
        age=f"{age_years:03d}Y",
        study_uid="",
        study_date=str(study_date).replace("-", ""),
        study_time=f"{hh:02d}{mm:02d}{ss:02d}",
        accession=f"SA{token % 10**10:010d}",
        description=str(sc.choice(vendor.study_descriptions)),
        body_part=str(sc.choice(vendor.body_parts)),
        frame_uid="",
        station=f"CT{int(sc.integers(1, 9))}",
        kvp=float(sc.choice([120.0, 120.0, 100.0, 140.0])),
        signed=vendor.signed,
        uid_salt=options.uid_salt,
    )
    study.study_uid = _uid(study, "study")
    study.frame_uid = _uid(study, "frame")
    return study


@dataclass
class _Protocol:
    matrix: int
    thickness: float
    soft_kernel: str
    bone_kernel: str
    noise_sigma: float
    fov: float
    ps: tuple[float, float]


def _protocol(
    sc: np.random.Generator, vendor: _Vendor, ph: Phantom | CylinderPhantom, options: SynthOptions,
    u_matrix: float,
) -> _Protocol:  # fmt: skip
    """Matrix, thickness, kernels, noise and field of view of the routine protocol."""
    if options.matrix == "mixed":
        matrix = 512 if u_matrix < 0.5 else 256
    else:
        matrix = int(options.matrix)
        if matrix not in (256, 512):
            raise ValueError("matrix must be 256, 512 or 'mixed'")
    thickness = float(sc.choice(vendor.thicknesses))
    soft_kernel = str(sc.choice(vendor.soft_kernels))
    bone_kernel = str(sc.choice(vendor.bone_kernels))
    noise_sigma = float(sc.uniform(3.0, 8.0)) * options.noise_scale
    fov_need = 2 * max(
        abs(ph.center[0]) + ph.radii[0] + ph.scalp, abs(ph.center[1]) + ph.radii[1] + ph.scalp
    ) + 12.0
    fov = float(sc.integers(math.ceil(max(205.0, fov_need)), 257))
    fov = min(fov, 256.0)
    ps_val = fov / 512.0 * (512 // matrix)
    return _Protocol(matrix, thickness, soft_kernel, bone_kernel, noise_sigma, fov, (ps_val, ps_val))


def _plan(
    ph: Phantom | CylinderPhantom, dr: _Draws, options: SynthOptions, proto: _Protocol, patterns: list[str]
) -> Stack:
    if isinstance(ph, CylinderPhantom):
        return plan_cylinder(ph, thickness=proto.thickness, ps=proto.ps, matrix=proto.matrix)
    if "thin" in patterns:
        return plan_thin(ph, fov=proto.fov, matrix=int(options.thin_matrix))
    if "two_stack" in patterns:
        return plan_two_stack(ph, ps=proto.ps, matrix=proto.matrix)
    tilted = dr.u_tilt < options.tilt_fraction
    tilt = dr.tilt_angle if tilted else 0.0
    tilt_mode = "none" if not tilted else ("table" if dr.u_shear < options.tilt_shear_fraction else "normal")
    return plan_standard(ph, thickness=proto.thickness, tilt=tilt, tilt_mode=tilt_mode, ps=proto.ps,
                         matrix=proto.matrix)  # fmt: skip


def _shifted(stack: Stack, dz: float) -> Stack:
    """The same planes with the table moved ``dz`` mm along the patient's z (positions as written)."""
    shift = np.array([0.0, 0.0, float(dz)])
    return replace(stack, centres=[c + shift for c in stack.centres],
                   ipps=[np.asarray(_r(ipp + shift)) for ipp in stack.ipps])  # fmt: skip


def _extended(stack: Stack, mm: float) -> Stack:
    """The stack with planes added below its first and above its last, each at its end's own step,
    until the range is ``mm`` longer at both ends."""
    lo = [stack.centres[0] - stack.centres[1], stack.ipps[0] - stack.ipps[1]]
    hi = [stack.centres[-1] - stack.centres[-2], stack.ipps[-1] - stack.ipps[-2]]
    n_lo = math.ceil(mm / float(np.linalg.norm(lo[0])))
    n_hi = math.ceil(mm / float(np.linalg.norm(hi[0])))
    centres = ([stack.centres[0] + k * lo[0] for k in range(n_lo, 0, -1)] + list(stack.centres)
               + [stack.centres[-1] + k * hi[0] for k in range(1, n_hi + 1)])  # fmt: skip
    ipps = ([np.asarray(_r(stack.ipps[0] + k * lo[1])) for k in range(n_lo, 0, -1)] + list(stack.ipps)
            + [np.asarray(_r(stack.ipps[-1] + k * hi[1])) for k in range(1, n_hi + 1)])  # fmt: skip
    thick = [stack.thicknesses[0]] * n_lo + list(stack.thicknesses) + [stack.thicknesses[-1]] * n_hi
    spacing = [stack.spacings[0]] * n_lo + list(stack.spacings) + [stack.spacings[-1]] * n_hi
    return replace(stack, centres=centres, ipps=ipps, thicknesses=thick, spacings=spacing)


def _render_stack(ph: Phantom | CylinderPhantom, stack: Stack, nsub: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU and lesion mask of the stack, each run of equal thickness rendered with its slab."""
    runs: list[tuple[int, int]] = []
    for k, t in enumerate(stack.thicknesses):
        if runs and stack.thicknesses[runs[-1][0]] == t:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    parts = [_render(ph, stack.ipps[a:b], stack.iop_a, stack.ps, stack.rows, stack.cols,  # type: ignore[arg-type]
                     stack.thicknesses[a], nsub) for a, b in runs]  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _noise(rng: np.random.Generator, stack: Stack, sigma: float, patterns: list[str]) -> np.ndarray:
    """Soft-kernel noise; thinner slices are noisier (sigma ~ 1/sqrt(thickness), relative to 5 mm)."""
    noise = _soft_noise(rng, (len(stack), stack.rows, stack.cols), sigma)
    if "thin" in patterns or "two_stack" in patterns:
        factor = np.sqrt(5.0 / np.asarray(stack.thicknesses, np.float32)) * np.float32(0.8)
        noise *= factor[:, None, None]
    return noise


def _lesion_centroid(stack: Stack, les_mask: np.ndarray) -> list[float] | None:
    """Mean patient position (LPS mm) of the primary pixels the lesion touches, over the planned stack."""
    ks, rs, cs = np.nonzero(les_mask)
    if ks.size == 0:
        return None
    iop = stack.iop_a
    ipp = np.asarray(stack.ipps, np.float64)[ks]
    pts = ipp + cs[:, None] * stack.ps[1] * iop[:3] + rs[:, None] * stack.ps[0] * iop[3:]
    return [round(float(x), 3) for x in pts.mean(axis=0)]


@dataclass
class _Words:
    """Descriptions and kernels of every series, after the patterns have had their say."""

    primary: str
    soft_kernel: str
    names: Names


def _words(study: _Study, proto: _Protocol, stack: Stack, dr: _Draws, patterns: list[str]) -> _Words:
    vendor = study.vendor
    p = dr.pattern_picks
    soft_kernel, bone_kernel = proto.soft_kernel, proto.bone_kernel
    bone_desc = ""
    if "thin" in patterns:
        soft_kernel = "STANDARD"
    if "bone_twin" in patterns:
        soft_k, sharp_k, descs = UNLISTED_KERNELS[vendor.key]
        soft_kernel = soft_k[p["twin_soft"] % len(soft_k)]
        bone_kernel = sharp_k[p["twin_sharp"] % len(sharp_k)]
        bone_desc = descs[p["twin_desc"] % len(descs)]
    thk = stack.thickness
    short = dict(vendor.kernel_short).get(soft_kernel, soft_kernel)
    primary = vendor.primary_fmt.format(thk=thk, kernel=soft_kernel, short=short)
    names = Names(
        localizer=vendor.localizer_desc,
        bone=vendor.bone_fmt.format(thk=thk, kernel=bone_kernel, short=bone_kernel),
        bone_kernel=bone_kernel,
        thin=vendor.thin_fmt.format(thk=vendor.thin_thickness, kernel=soft_kernel, short=short),
        soft_kernel=soft_kernel,
        reformat=vendor.reformat_desc,
    )
    if "no_head_words" in patterns:
        study.description = NO_HEAD_STUDY_DESCRIPTIONS[p["study_desc"] % len(NO_HEAD_STUDY_DESCRIPTIONS)]
        study.body_part = None
        primary = NO_HEAD_SERIES_FORMATS[p["series_fmt"] % len(NO_HEAD_SERIES_FORMATS)].format(
            thk=thk, kernel=soft_kernel
        )
        d = NO_HEAD_DISTRACTOR_DESCRIPTIONS
        names.bone = d["bone"][p["bone_desc"] % len(d["bone"])].format(thk=thk)
        thin_fmt = d["thin"][p["thin_desc"] % len(d["thin"])]
        names.thin = thin_fmt.format(thk=vendor.thin_thickness, kernel=soft_kernel)
        names.reformat = d["reformat"][p["reformat_desc"] % len(d["reformat"])]
    if bone_desc:
        names.bone = bone_desc
    return _Words(primary, soft_kernel, names)


def write_study(
    out_dir: Path,
    rng: np.random.Generator,
    *,
    lesion: str | None,
    options: SynthOptions,
    patient_index: int,
    pattern: str | Iterable[str] | None = None,
    kind: str = "head",
    stray: bool = False,
    thickness_mm: float | None = None,
    noise_seed: int | None = None,
    table_shift_mm: float = 0.0,
    extend_mm: float = 0.0,
) -> StudyTruth:
    """Write one study under ``out_dir`` (the study folder: ``out_dir/<series_folder>/<n>.dcm``).

    ``lesion`` is None, "hemorrhage", "infarct" or "kind:subtype".  A fixed number of values is
    drawn from ``rng`` up front, whatever the lesion and options, so the same generator state gives
    the same subject, scanner, noise and UIDs with or without a lesion or a hard case.
    ``pattern`` forces patterns of :data:`PATTERNS` (a name or several) whatever the fractions;
    ``kind="phantom"`` is the same as ``pattern="phantom"`` (a water cylinder; no lesion, label normal).
    ``stray`` writes only the middle slice of the primary series and nothing else (see
    :func:`training.synth.dataset.write_stray`).

    The same subject scanned again (the equivalence bench: one head, several acquisitions): the same
    ``rng`` state with ``thickness_mm`` (the routine protocol's slice thickness instead of the drawn one),
    ``noise_seed`` (a new noise realisation instead of the drawn one) or ``table_shift_mm`` (every plane
    moved that far along the patient's z: another slice phase over the same head) and ``extend_mm`` (the
    scan range that much longer at both ends, in slices of the end stacks: a range that covers the whole
    canonical grid whatever the tilt, so two acquisitions differ in resampling, not in coverage). None of
    them changes any other draw, so the head, scanner and words stay those of the unchanged study.
    """
    out_dir = Path(out_dir)
    dr = _draw(rng, options)
    patterns = [] if stray else _patterns(dr, options, pattern, kind)
    if "phantom" in patterns:
        ph: Phantom | CylinderPhantom = make_cylinder(np.random.default_rng(dr.phantom_seed))
        lesion = None
    else:
        ph = make_phantom(np.random.default_rng(dr.phantom_seed), lesion)
    lesion_kind, _ = _parse_lesion(lesion)
    sc = np.random.default_rng(dr.scan_seed)
    study = _scanner(sc, options, ph, dr.token, patient_index)
    vendor = study.vendor
    proto = _protocol(sc, vendor, ph, options, dr.u_matrix)
    if thickness_mm is not None:
        proto.thickness = float(thickness_mm)
    stack = _plan(ph, dr, options, proto, patterns)
    if extend_mm:
        stack = _extended(stack, extend_mm)
    if table_shift_mm:
        stack = _shifted(stack, table_shift_mm)

    clean, les_mask = _render_stack(ph, stack, max(1, int(options.slab_samples)))
    if lesion_kind is not None and not les_mask.any():
        raise RuntimeError("lesion not visible in the primary series; phantom/lesion sites disagree")
    noise_rng = np.random.default_rng(dr.noise_seed if noise_seed is None else noise_seed)
    soft = clean + _noise(noise_rng, stack, proto.noise_sigma, patterns)
    words = _words(study, proto, stack, dr, patterns)

    roles = dict(vendor.series_numbers)
    series_list: list[_Series] = []

    def new_series(
        role: str, desc: str, kernel: str, image_type: list[str], window: tuple[float, float]
    ) -> _Series:
        num = roles[role]
        s = _Series(role, _uid(study, "series", role), num, desc, kernel, image_type, window,
                    out_dir / f"series_{num:04d}")  # fmt: skip
        series_list.append(s)
        return s

    prim = new_series("primary", words.primary, words.soft_kernel, ["ORIGINAL", "PRIMARY", "AXIAL"],
                      vendor.soft_window)  # fmt: skip

    lay = _layout(dr, options, study.vendor, len(stack), patterns, stray)
    enhanced = "enhanced" in patterns
    _write_primary(study, prim, stack, _to_raw(soft, study.signed), lay, enhanced=enhanced,
                   head="no_head_words" not in patterns)  # fmt: skip

    mixed_instances: list[int] = []
    if dr.u_mixed < options.mixed_orientation_fraction and not enhanced and not stray:
        mixed_instances = _write_mixed(study, prim, ph, stack, noise_rng, proto.noise_sigma, lay.syntax)

    if options.distractors and not stray:
        write_distractors(
            study, ph, vendor, new_series, np.random.default_rng(dr.distr_seed), clean=clean, stack=stack,
            names=words.names, noise_sigma=proto.noise_sigma, fov=proto.fov,
        )  # fmt: skip
    elif "bone_twin" in patterns:
        write_bone(
            study, new_series, np.random.default_rng(dr.twin_seed), stack, clean,
            description=words.names.bone, kernel=words.names.bone_kernel, noise_sigma=proto.noise_sigma,
        )  # fmt: skip

    return _truth(
        study, ph, dr, stack, les_mask, lay, series_list, prim, words, proto, patterns, mixed_instances,
        study_dir=out_dir.name, patient_index=patient_index, lesion_kind=lesion_kind, stray=stray,
    )  # fmt: skip


@dataclass
class _Layout:
    """How the primary's planned slices become files: numbering, the dropped one, the syntax."""

    inst: list[int]  # instance number per planned (spatial) index
    keep: list[int]  # spatial indices written
    dropped: int | None
    descending: bool
    reversed_by_option: bool
    syntax: str


def _layout(
    dr: _Draws, options: SynthOptions, vendor: _Vendor, n_planned: int, patterns: list[str], stray: bool
) -> _Layout:
    """Hard cases on the primary series: reversed numbering, a missing slice, compression."""
    rev_opt = dr.u_rev < options.reverse_fraction
    descending = vendor.superior_first != rev_opt
    inst = [n_planned - k if descending else k + 1 for k in range(n_planned)]
    dropped = None
    if ("thin" in patterns or dr.u_miss < options.missing_fraction) and n_planned > 6:
        dropped = 2 + int(dr.miss_pos * (n_planned - 4))
    syntax = ExplicitVRLittleEndian
    if dr.u_comp < options.compressed_fraction:
        avail = _available_syntaxes(options.compressed_syntaxes)
        syntax = avail[int(dr.comp_pick * len(avail))]
    if "thin" in patterns:
        syntax = JPEGLosslessSV1
    keep = [n_planned // 2] if stray else [k for k in range(n_planned) if k != dropped]
    return _Layout(inst, keep, dropped, descending, rev_opt, syntax)


def _write_primary(
    study: _Study, prim: _Series, stack: Stack, raw: np.ndarray, lay: _Layout, *, enhanced: bool, head: bool
) -> None:
    """One file per kept slice, or one Enhanced CT instance holding them all as frames."""
    if enhanced:
        write_enhanced(study, prim, stack, raw, lay.inst, lay.keep, lay.syntax, head=head)
        return
    for k in lay.keep:
        ds = _ct_image(
            study, prim, instance=lay.inst[k], raw=raw[k], ipp=list(stack.ipps[k]), iop=stack.iop,
            ps=stack.ps, thickness=stack.thicknesses[k], spacing=stack.spacings[k], tilt=stack.tilt,
            slice_location=float(stack.centres[k][2]),
        )  # fmt: skip
        _save(ds, prim, lay.inst[k], lay.syntax)


def _truth(
    study: _Study, ph: Phantom | CylinderPhantom, dr: _Draws, stack: Stack, les_mask: np.ndarray,
    lay: _Layout, series_list: list[_Series], prim: _Series, words: _Words, proto: _Protocol,
    patterns: list[str], mixed_instances: list[int], *, study_dir: str, patient_index: int,
    lesion_kind: str | None, stray: bool,
) -> StudyTruth:  # fmt: skip
    """What was written, for tests and evaluations (see :class:`StudyTruth`)."""
    vendor = study.vendor
    n_planned = len(stack)
    enhanced = "enhanced" in patterns
    les_obj = ph.lesion
    return StudyTruth(
        study_uid=study.study_uid,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        accession=study.accession,
        label="abnormal" if lesion_kind else "normal",
        lesion=lesion_kind or "",
        lesion_subtype=les_obj.subtype if les_obj else "",
        lesion_site=les_obj.site if les_obj else "",
        lesion_spec=f"{les_obj.kind}:{les_obj.subtype}" if les_obj else "",
        lesion_voxels=int(les_mask.sum()),
        lesion_slices=[int(k) for k in np.flatnonzero(les_mask.any(axis=(1, 2)))],
        vendor=vendor.key,
        manufacturer=study.manufacturer,
        study_dir=study_dir,
        primary_series_uid=prim.uid,
        series_roles={s.uid: s.role for s in series_list},
        series_dirs={s.uid: s.folder.name for s in series_list},
        series_files={s.uid: s.count for s in series_list},
        n_slices=len(lay.keep),  # slices (frames of one instance when enhanced)
        n_slices_planned=n_planned,
        slice_spacing=stack.spacing,
        slice_thickness=stack.thickness,
        slice_step=[float(x) for x in stack.step],
        pixel_spacing=[float(stack.ps[0]), float(stack.ps[1])],
        rows=stack.rows,
        cols=stack.cols,
        matrix=stack.rows,
        tilt_deg=stack.tilt,
        tilt_mode=stack.tilt_mode,
        iop=[float(x) for x in stack.iop],
        ipp_first=[float(x) for x in stack.ipps[0]],
        dropped_index=lay.dropped,
        reversed=lay.descending,
        reversed_by_option=lay.reversed_by_option,
        transfer_syntax=str(lay.syntax),
        pixel_representation=1 if study.signed else 0,
        bits_stored=16 if study.signed else 12,
        kernel=words.soft_kernel,
        noise_sigma=proto.noise_sigma,
        mixed_orientation_instances=mixed_instances,
        instance_numbers=[lay.inst[k] if k in lay.keep else None for k in range(n_planned)],
        phantom_seed=dr.phantom_seed,
        patient_index=patient_index,
        phantom_meta=_jsonable(ph.meta),
        kind="stray" if stray else ("phantom" if "phantom" in patterns else "head"),
        patterns=patterns,
        lesion_centroid=_lesion_centroid(stack, les_mask),
        sop_class_uid=ENHANCED_CT_IMAGE_STORAGE if enhanced else CT_IMAGE_STORAGE,
        slice_thicknesses=[float(t) for t in stack.thicknesses],
        positions=[[float(x) for x in p] for p in stack.ipps],
        twin_series_uid=_twin_uid(series_list, patterns),
    )


def _twin_uid(series_list: list[_Series], patterns: list[str]) -> str:
    if "bone_twin" not in patterns:
        return ""
    return next((s.uid for s in series_list if s.role == "bone"), "")


def _write_mixed(
    study: _Study, prim: _Series, ph: Phantom | CylinderPhantom, stack: Stack, noise_rng: np.random.Generator,
    noise_sigma: float, syntax: str,
) -> list[int]:  # fmt: skip
    """Two coronal images appended to the primary series (a mixed-orientation series)."""
    rows, cols, ps, thickness = stack.rows, stack.cols, stack.ps, stack.thickness
    n_planned = len(stack)
    numbers = []
    cor_iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    cor = np.asarray(cor_iop)
    top_z = float(max(c[2] for c in stack.centres))
    for j, dy in enumerate((-10.0, 10.0)):
        y = float(ph.center[1]) + dy
        c = np.array([0.0, y, top_z - (rows - 1) / 2.0 * ps[0]])
        corner = c - ((cols - 1) / 2.0) * ps[1] * cor[:3] - ((rows - 1) / 2.0) * ps[0] * cor[3:]
        ipp = np.asarray(_r(corner))
        img, _ = _render(ph, [ipp], cor, ps, rows, cols, thickness, 1)  # type: ignore[arg-type]
        img = img + _soft_noise(noise_rng, img.shape, noise_sigma)
        number = n_planned + 1 + j
        ds = _ct_image(
            study, prim, instance=number, raw=_to_raw(img[0], study.signed), ipp=list(ipp), iop=cor_iop,
            ps=ps, thickness=thickness, spacing=None, tilt=0.0, slice_location=y,
        )  # fmt: skip
        _save(ds, prim, number, syntax)
        numbers.append(number)
    return numbers

