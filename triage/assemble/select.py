"""Series selection: describe every series of a study from its headers, reject with a reason or rank.

Refused from headers only for what headers tell for sure, in order: image storage SOP class (CT
Image or Enhanced CT), modality, ImageType (all of ``required_image_type``, none of
``rejected_image_type``; Enhanced CT's VOLUME counts as AXIAL), "1 image: no volume", slice
thickness range (0.5-10 mm), geometry present, orientation (slice normal within ``max_tilt_deg``),
coverage along the normal. Header words about the body part, the kernel or reformats are hints for
ranking only: whether a series is a head is decided from its content when it is built
(:mod:`triage.assemble.content`), so empty, foreign or protocol-only descriptions refuse nothing.

Candidates are ranked by :func:`rank_key`: headers naming another body part last; sharpness from the
image (brain noise measured on three slices of each candidate when a study has more than one); head
words; kernel name and reformat words; slice thickness closest to the 4-5 mm band; coverage; brain
noise (the smoother of two reconstructions wins); then description text. Never a UID, a file name or
the arrival order (the series UID only breaks a tie between series equal in all of these, which then
give the same volume). A series whose instances have more than one orientation keeps its largest
orientation group; equal-sized groups are ambiguous and the series is rejected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from triage.assemble.common import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_STORAGE,
    NOT_PREFERRED,
    VolumeError,
    _sop_class_name,
)
from triage.assemble.content import brain_noise
from triage.assemble.geometry import OrientationGroup, _main_group, _orientation_groups
from triage.assemble.headers import InstanceHeader, _dcmread, expand_frames
from triage.assemble.pixels import _Slice, slice_hu
from triage.config import AssemblySettings


@dataclass(frozen=True)
class SeriesInfo:
    """A series as far as the headers tell: what selection ranks and what a rejection reason quotes."""

    series_uid: str
    study_uid: str
    n_instances: int
    modality: str
    sop_class_uids: tuple[str, ...]
    image_type: tuple[str, ...]  # the most common ImageType of the instances
    image_type_values: frozenset[str]  # every value that occurs in any instance's ImageType
    body_part: str
    study_description: str
    series_description: str
    protocol_name: str
    kernel: str
    slice_thickness: float | None  # median SliceThickness, else the median step between slices
    pixel_spacing: tuple[float, float] | None
    matrix: tuple[int, int] | None  # (rows, columns) when all instances agree
    orientations: tuple[OrientationGroup, ...]  # largest first
    orientation: str  # axial / coronal / sagittal / oblique / mixed / none (the largest group's)
    tilt_deg: float | None  # of the largest orientation group
    slice_spacing: float | None  # median step along the normal, largest group
    coverage_mm: float  # centre-to-centre extent along the normal, largest group
    n_frames: int  # the largest NumberOfFrames (1 for single-frame images)
    missing_geometry: int  # instances without position, orientation or pixel spacing
    problems: tuple[str, ...]
    n_slices: int = 0  # images (frames of a multi-frame instance count one each)
    brain_noise_hu: float | None = None  # measured on a few slices by select_series (content)


def _most_common(values: Iterable[Any], default: Any) -> Any:
    counts = Counter(v for v in values if v not in (None, "", ()))
    if not counts:
        return default
    # ties broken by the value, not by which file came first: arrival order must not matter
    return max(counts.items(), key=lambda kv: (kv[1], str(kv[0])))[0]


def describe_series(headers: Sequence[InstanceHeader]) -> SeriesInfo:
    """Summarise one series' headers (all from the same SeriesInstanceUID)."""
    if not headers:
        raise VolumeError("describe_series: no instances")
    hs = list(headers)
    groups = _orientation_groups(hs)
    main = groups[0] if groups else None
    positions = []
    if main is not None:
        n = np.asarray(main.normal)
        positions = sorted(float(np.dot(h.position, n)) for h in main.headers if h.position is not None)
    steps = np.diff(np.unique(np.round(positions, 3))) if len(positions) > 1 else np.array([])
    spacing = float(np.median(steps)) if steps.size else None
    thick = [h.slice_thickness for h in hs if h.slice_thickness and h.slice_thickness > 0]
    matrices = {(h.rows, h.columns) for h in hs if h.rows and h.columns}
    if len(groups) > 1:
        label = "mixed" if len(groups[1].headers) == len(groups[0].headers) else groups[0].label
    else:
        label = main.label if main else "none"
    problems = sorted({f"{p}" for h in hs for p in h.problems})
    return SeriesInfo(
        series_uid=hs[0].series_uid,
        study_uid=hs[0].study_uid,
        n_instances=len({h.sop_instance_uid for h in hs}),
        modality=_most_common((h.modality for h in hs), ""),
        sop_class_uids=tuple(sorted({h.sop_class_uid for h in hs})),
        image_type=_most_common((h.image_type for h in hs), ()),
        image_type_values=frozenset(v for h in hs for v in h.image_type),
        body_part=_most_common((h.body_part for h in hs), ""),
        study_description=_most_common((h.study_description for h in hs), ""),
        series_description=_most_common((h.series_description for h in hs), ""),
        protocol_name=_most_common((h.protocol_name for h in hs), ""),
        kernel=_most_common((h.kernel for h in hs), ""),
        slice_thickness=float(np.median(thick)) if thick else spacing,
        pixel_spacing=_most_common((h.pixel_spacing for h in hs), None),
        matrix=next(iter(matrices)) if len(matrices) == 1 else None,
        orientations=tuple(groups),
        orientation=label,
        tilt_deg=main.tilt_deg if main else None,
        slice_spacing=spacing,
        coverage_mm=(positions[-1] - positions[0]) if len(positions) > 1 else 0.0,
        n_frames=max(h.number_of_frames for h in hs),
        missing_geometry=sum(
            1 for h in hs if h.position is None or h.orientation is None or h.pixel_spacing is None
        ),
        problems=tuple(problems),
        n_slices=len({h.key for h in hs}),
    )


# --------------------------------------------------------------------------------------------------
# selection


def _matches(text: str, patterns: Iterable[str]) -> str | None:
    up = text.upper()
    for p in patterns:
        if p and p.upper() in up:
            return p
    return None


def kernel_class(info: SeriesInfo, rules: AssemblySettings) -> str:
    """'soft', 'sharp' or 'unknown' from ConvolutionKernel, else from the series description.

    Sharp wins when both match: a bone-kernel series scored as brain would be out of distribution.
    """
    for text in (info.kernel, info.series_description):
        if not text:
            continue
        if _matches(text, rules.sharp_kernel_patterns):
            return "sharp"
        if _matches(text, rules.soft_kernel_patterns):
            return "soft"
    return "unknown"


def content_class(info: SeriesInfo, rules: AssemblySettings) -> str:
    """'sharp' when the measured brain noise is above ``sharp_noise_hu``, 'soft' below it, else the
    name's class (:func:`kernel_class`): the image outranks the kernel name."""
    if info.brain_noise_hu is None:
        return kernel_class(info, rules)
    return "sharp" if info.brain_noise_hu > rules.sharp_noise_hu else "soft"


def _name_hint(info: SeriesInfo, rules: AssemblySettings) -> int:
    """0: a soft kernel name, 1: nothing known, 2: a sharp kernel name or a reformat/rendering."""
    if _matches(info.series_description, rules.reformat_patterns):
        return 2
    return {"soft": 0, "unknown": 1, "sharp": 2}[kernel_class(info, rules)]


def _head_hint(info: SeriesInfo, rules: AssemblySettings) -> int:
    """0: header words name the head, 1: no body part or description says anything, 2: a body part
    that is not the head. Only a hint for ranking: the content decides (:mod:`.content`)."""
    if _is_head(info, rules):
        return 0
    return 2 if info.body_part else 1


def _is_head(info: SeriesInfo, rules: AssemblySettings) -> bool:
    for text in (info.body_part, info.series_description, info.protocol_name):
        if text and _matches(text, rules.head_patterns):
            return True
    if info.body_part:
        return False  # a body part that is not the head outranks a study description that mentions it
    return bool(_matches(info.study_description, rules.head_patterns))


def rejection(info: SeriesInfo, rules: AssemblySettings) -> tuple[str, str] | None:
    """``(category, reason)`` when a series cannot be the scored one, None when it is a candidate.

    The category is one of a small closed set (``not_ct``, ``image_type``, ``not_head``,
    ``slice_thickness``, ``geometry``, ``tilt``, ``coverage``; the names :mod:`triage.ops.metrics` counts
    by), for labels; the reason is the full sentence, for people.
    """
    classes = set(info.sop_class_uids)
    ct = {CT_IMAGE_STORAGE, *ENHANCED_CT_STORAGE}
    if not classes <= ct:
        other = sorted(classes - ct)
        return "not_ct", f"SOP class {', '.join(_sop_class_name(c) for c in other)} is not CT Image Storage"
    allowed = [m.upper() for m in rules.modalities]
    if info.modality not in allowed:
        return "not_ct", f"modality {info.modality or '(none)'} is not one of {allowed}"
    shown = "\\".join(info.image_type) or "(none)"
    bad = [v for v in rules.rejected_image_type if v.upper() in info.image_type_values]
    if bad:
        return "image_type", f"ImageType {shown} contains {'/'.join(bad)}"
    values = set(info.image_type_values)
    if classes & set(ENHANCED_CT_STORAGE) and "VOLUME" in values:
        # Enhanced CT's third value is the image flavor: VOLUME for a stack of axial frames (PS3.3
        # C.8.16.1); the orientation itself is checked from the frames' geometry below
        values.add("AXIAL")
    lacking = [v for v in rules.required_image_type if v.upper() not in values]
    if lacking:
        return "image_type", f"ImageType {shown} lacks {'/'.join(lacking)}"
    if info.n_slices == 1:
        return "too_few_slices", "1 image: no volume"
    if info.slice_thickness is None:
        return "slice_thickness", "no SliceThickness and no slice positions to derive it from"
    lo, hi = rules.min_slice_thickness_mm, rules.max_slice_thickness_mm
    if not lo <= info.slice_thickness <= hi:
        return "slice_thickness", f"slice thickness {info.slice_thickness:g} mm outside [{lo:g}, {hi:g}] mm"
    if info.missing_geometry:
        return "geometry", (
            f"{info.missing_geometry} of {info.n_slices} images lack ImagePositionPatient, "
            "ImageOrientationPatient or PixelSpacing"
        )
    try:
        main, _ = _main_group(list(info.orientations), info.series_uid)
    except VolumeError as exc:
        return exc.category, exc.reason.split(": ", 1)[1]
    if main.tilt_deg > rules.max_tilt_deg:
        return "tilt", (
            f"orientation {main.label}: slice normal {main.tilt_deg:.1f} deg from the patient z axis "
            f"(max_tilt_deg {rules.max_tilt_deg:g})"
        )
    if info.matrix is None:
        return "geometry", "instances differ in Rows/Columns"
    if info.coverage_mm < rules.min_coverage_mm:
        return "coverage", (
            f"coverage {info.coverage_mm:.1f} mm along the slice normal is below min_coverage_mm "
            f"{rules.min_coverage_mm:g}"
        )
    return None


def rejection_reason(info: SeriesInfo, rules: AssemblySettings) -> str | None:
    """Why a series cannot be the scored one (the sentence of :func:`rejection`), or None."""
    found = rejection(info, rules)
    return None if found is None else found[1]


def _thickness_distance(t: float) -> float:
    return 0.0 if 4.0 <= t <= 5.0 else min(abs(t - 4.0), abs(t - 5.0))


@dataclass
class SelectionResult:
    """Which series of a study to score, and why each other series was not chosen.

    ``candidates`` lists every acceptable series best first (``chosen`` is the first): when
    :func:`build_volume` rejects the chosen one (a missing slice, say), a caller may try the next.
    """

    chosen: str | None
    skipped: dict[str, str]
    reason: str | None = None  # why nothing was chosen
    candidates: list[str] = field(default_factory=list)
    instances: list[InstanceHeader] = field(default_factory=list)  # the chosen series' usable instances
    warnings: list[str] = field(default_factory=list)
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)  # skipped series -> short category
    why: str = ""  # what the chosen series is and by which rule it won


def _summary(info: SeriesInfo, rules: AssemblySettings) -> str:
    klass = content_class(info, rules)
    kernel = f"{klass} kernel {info.kernel!r}" if info.kernel else f"{klass} kernel"
    noise = f", brain noise {info.brain_noise_hu:.1f} HU" if info.brain_noise_hu is not None else ""
    return f"{kernel}{noise}, {info.slice_thickness:g} mm, {info.coverage_mm:.0f} mm coverage"


RANKING = (
    "headers naming another body part last, then sharpness from the image (soft before sharp; "
    "the kernel name only when the image cannot tell), "
    "head words in the headers, kernel name and reformat words, slice thickness closest to the 4-5 mm "
    "band (a vendor's thick reconstruction over a thin one averaged here), coverage, brain noise "
    "(the smoother of two reconstructions), then description text"
)


def rank_key(info: SeriesInfo, rules: AssemblySettings) -> tuple[Any, ...]:
    """The sort key of a candidate: content first, header values after; never a UID, a file name or
    the arrival order, so the same study sent again with new UIDs picks the same pixels."""
    assert info.slice_thickness is not None
    noise = info.brain_noise_hu
    head = _head_hint(info, rules)
    return (
        head == 2,  # headers that name another body part: last (the content check would refuse it)
        {"soft": 0, "unknown": 1, "sharp": 2}[content_class(info, rules)],
        head,
        _name_hint(info, rules),
        round(_thickness_distance(info.slice_thickness), 3),
        -round(info.coverage_mm),
        round(noise, 1) if noise is not None else float("inf"),
        info.series_description,
        info.kernel,
        info.protocol_name,
        -info.n_slices,
        round(info.slice_thickness, 3),
    )


def _measure_noise(info: SeriesInfo) -> float | None:
    """Brain noise of three slices around the middle of the series' main orientation group."""
    if not info.orientations:
        return None
    group = info.orientations[0]
    n = np.asarray(group.normal)
    hs = sorted(
        (h for h in group.headers if h.position is not None),
        key=lambda h: (float(np.dot(h.position, n)), h.key),
    )
    if len(hs) < 3:
        return None
    picks = [hs[int(len(hs) * q)] for q in (0.4, 0.5, 0.6)]
    images = []
    cache: dict[str, Dataset] = {}
    arrays: dict[int, np.ndarray] = {}
    try:
        for h in picks:
            ds = cache.get(str(h.path)) or _dcmread(h.path, pixels=True)
            cache[str(h.path)] = ds
            images.append(slice_hu(_Slice(h, ds), arrays))
    except VolumeError:
        return None
    return brain_noise(images, info.slice_thickness)


def _ranked_below(chosen: SeriesInfo, other: SeriesInfo, rules: AssemblySettings) -> str:
    return (
        f"candidate ranked below {chosen.series_uid} ({_summary(chosen, rules)}; "
        f"this one: {_summary(other, rules)})"
    )


def select_series(
    series: Mapping[str, Sequence[InstanceHeader]],
    rules: AssemblySettings | None = None,
    *,
    content: bool = True,
) -> SelectionResult:
    """Choose the axial soft-tissue head-CT series of one study; every other series gets a reason.

    With ``content`` (the default) and more than one candidate, a few slices of each candidate are
    decoded to measure its brain noise (:func:`rank_key` says how candidates are ordered).
    """
    rules = rules or AssemblySettings()
    series = {uid: expand_frames(hs) for uid, hs in series.items()}
    skipped: dict[str, str] = {}
    categories: dict[str, str] = {}
    infos: dict[str, SeriesInfo] = {}
    ranked: list[tuple[tuple[Any, ...], str]] = []
    for uid in sorted(series):
        headers = list(series[uid])
        if not headers:
            categories[uid], skipped[uid] = "invalid", "no instances"
            continue
        info = describe_series(headers)
        infos[uid] = info
        found = rejection(info, rules)
        if found:
            categories[uid], skipped[uid] = found
            continue
        ranked.append(((), uid))
    if content and len(ranked) > 1:  # the image tells sharp from soft where names do not
        for _, uid in ranked:
            infos[uid] = replace(infos[uid], brain_noise_hu=_measure_noise(infos[uid]))
    ranked = [(rank_key(infos[uid], rules), uid) for _, uid in ranked]
    ranked.sort()
    if not ranked:
        detail = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "the study has no series"
        return SelectionResult(
            chosen=None,
            skipped=skipped,
            reason=f"no axial head-CT series qualifies ({detail})",
            series=infos,
            categories=categories,
        )
    chosen = ranked[0][1]
    for _, uid in ranked[1:]:
        categories[uid], skipped[uid] = NOT_PREFERRED, _ranked_below(infos[chosen], infos[uid], rules)
    main, warnings = _main_group(list(infos[chosen].orientations), chosen)
    why = f"{_summary(infos[chosen], rules)}"
    if len(ranked) > 1:
        why += f"; chosen over {len(ranked) - 1} other candidate(s) by: {RANKING}"
    return SelectionResult(
        chosen=chosen,
        skipped=skipped,
        why=why,
        candidates=[uid for _, uid in ranked],
        instances=list(main.headers),
        warnings=warnings,
        series=infos,
        categories=categories,
    )
