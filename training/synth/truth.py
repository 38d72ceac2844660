"""What to generate (:class:`SynthOptions`) and what was generated (:class:`StudyTruth`).

Why apart: the options and the ground truth are the generator's contract with its users (tests,
experiments, the assembly room's tests); keeping them in a small module makes that contract easy
to read and to import without the renderers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from training.synth.basics import _jsonable

# The real-scanner patterns of issue 11 that a study can carry (StudyTruth.patterns, labels.csv).
# "thin", "two_stack" and "enhanced" change how the primary series is acquired or stored,
# "no_head_words" its words, "bone_twin" adds a sharp reconstruction of the same acquisition,
# "phantom" replaces the head by a water cylinder; "stray" marks a lone slice of another study.
PATTERNS = ("thin", "two_stack", "no_head_words", "enhanced", "bone_twin", "phantom")
STUDY_KINDS = ("head", "phantom", "stray")


@dataclass
class SynthOptions:
    """What to generate.  Fractions are per-study probabilities of a hard case.

    Defaults describe clean data (no hard cases) so that tests are deterministic and simple; the
    fractions exist to exercise the consumer's robustness.  Random draws for every hard case are
    made whether or not the fraction is zero, so changing one fraction flips only that decision and
    leaves every other property of every study unchanged.
    """

    matrix: int | str = 256  # 256, 512 or "mixed"
    tilt_fraction: float = 0.0
    tilt_range_deg: tuple[float, float] = (10.0, 20.0)
    # Of the tilted studies, the fraction whose slice positions step along the table (z) axis like
    # real scanners do (a sheared stack), instead of along the tilted plane normal.
    tilt_shear_fraction: float = 0.0
    reverse_fraction: float = 0.0
    missing_fraction: float = 0.0
    compressed_fraction: float = 0.0
    mixed_orientation_fraction: float = 0.0
    distractors: bool = True
    # Sub-samples across the slice thickness (partial-volume averaging).  1 = point sampling, which
    # makes "pixel == phantom at its centre" exact up to rounding (used by geometry tests).
    slab_samples: int = 3
    noise_scale: float = 1.0
    vendors: tuple[str, ...] | None = None  # restrict to these vendor keys (see _VENDORS)
    compressed_syntaxes: tuple[str, ...] = (RLELossless, JPEG2000Lossless, JPEGLSLossless)
    # Real scanners' patterns (issue 11), each a per-study fraction drawn like the ones above (the
    # draws come after the older ones, from the same stream, so adding them changed nothing else).
    # Primary as a 0.625 mm thin axial series: JPEG Lossless SV1, 8.5 deg tilt, one slice missing.
    thin_fraction: float = 0.0
    thin_matrix: int = 512  # the thin series' matrix; tests use a smaller one to stay fast
    # Primary as one series of two stacks: 4 mm over the posterior fossa, 7 mm above, 18.5 deg tilt.
    two_stack_fraction: float = 0.0
    # No BodyPartExamined; descriptions are protocol names or another language, no English head word.
    no_head_words_fraction: float = 0.0
    # Primary as one Enhanced CT Image Storage instance (multi-frame, per-frame functional groups).
    enhanced_fraction: float = 0.0
    # A sharp reconstruction of the same acquisition whose kernel names are in no project list.
    bone_twin_fraction: float = 0.0
    # A water cylinder phantom instead of a head (no skull, no brain; mostly air on the canonical grid).
    phantom_fraction: float = 0.0
    # Non-empty: every UID (study, series, SOP, frame of reference) is derived anew, nothing else
    # changes (same pixels, headers, file names): "the same study sent again with new UIDs".
    uid_salt: str = ""


@dataclass
class StudyTruth:
    """Ground truth for one study; JSON-serialisable through :meth:`to_dict`.

    Geometry fields describe the *primary* series' planned stack in spatial order (index 0 is the
    most inferior slice along the plane normal), before any slice was dropped.
    """

    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    label: str  # "normal" | "abnormal"
    lesion: str  # "" | "hemorrhage" | "infarct"
    lesion_subtype: str
    lesion_site: str
    lesion_spec: str  # pass to make_phantom() to rebuild the exact phantom
    lesion_voxels: int  # primary-series pixels touched by the lesion (any slab sub-sample)
    lesion_slices: list[int]  # spatial indices of primary slices that contain lesion
    vendor: str
    manufacturer: str
    study_dir: str
    primary_series_uid: str
    series_roles: dict[str, str]
    series_dirs: dict[str, str]
    series_files: dict[str, int]
    n_slices: int  # axial primary files written (excludes mixed-orientation extras)
    n_slices_planned: int
    slice_spacing: float  # perpendicular distance between adjacent planned planes (mm)
    slice_thickness: float
    slice_step: list[float]  # IPP_{k+1} - IPP_k for the planned stack (patient mm)
    pixel_spacing: list[float]  # [between rows, between columns]
    rows: int
    cols: int
    matrix: int
    tilt_deg: float
    tilt_mode: str  # "none" | "normal" | "table"
    iop: list[float]
    ipp_first: list[float]
    dropped_index: int | None
    reversed: bool  # instance numbers decrease as position ascends along the normal
    reversed_by_option: bool
    transfer_syntax: str
    pixel_representation: int
    bits_stored: int
    kernel: str
    noise_sigma: float
    mixed_orientation_instances: list[int]
    instance_numbers: list[int | None]  # per planned spatial index; None where dropped
    phantom_seed: int
    patient_index: int
    phantom_meta: dict[str, Any] = field(default_factory=dict)
    # Added for issue 11/12 (defaults keep older truth.jsonl files readable).
    kind: str = "head"  # "head" | "phantom" (water cylinder) | "stray" (a lone slice of another study)
    patterns: list[str] = field(default_factory=list)  # members of PATTERNS, in PATTERNS order
    # Lesion centroid in patient coordinates (LPS, mm): mean of the centres of the primary series'
    # pixels (planned stack, the dropped slice included) that the lesion touches (core or oedema, at
    # any slab sub-sample).  For a crescent (subdural) it may lie outside the lesion itself.
    lesion_centroid: list[float] | None = None
    sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.2"  # of the primary series
    slice_thicknesses: list[float] = field(default_factory=list)  # per planned slice (two stacks vary)
    positions: list[list[float]] = field(default_factory=list)  # planned IPPs in spatial order
    twin_series_uid: str = ""  # the bone twin's series (pattern "bone_twin")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyTruth:
        return cls(**d)
