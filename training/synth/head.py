"""Synthetic head-CT phantom studies written as real DICOM (the generator's public face).

Why this exists: the triage daemon must be trained, tested and demonstrated without patient data,
and its hardest bugs are not in the flow model but in the DICOM plumbing (series selection, slice
sorting, tilted or incomplete stacks, compressed transfer syntaxes, vendor habits, the patterns real
scanners send).  The generator lives in small modules of :mod:`training.synth`:

* ``phantom`` (the analytic head), ``lesions``, ``cylinder`` (a QA water phantom);
* ``vendors`` (scanner habits), ``geometry`` (the primary stack of each protocol), ``render``;
* ``dicom`` (datasets, pixels, saving), ``ljpeg`` (JPEG Lossless SV1 encoder), ``enhanced``
  (Enhanced CT multi-frame), ``distractors``;
* ``study`` (:func:`write_study`), ``dataset`` (:func:`write_dataset`, labels, the CLI);
* ``truth`` (:class:`SynthOptions`, :class:`StudyTruth`).

This module re-exports their public names so ``from training.synth.head import ...`` and
``python -m training.synth.head`` keep working.

Design: the anatomy is an analytic function of patient coordinates, every image is the phantom
evaluated at the patient-space centre of each pixel (so headers are exact by construction), all
randomness flows from one generator per study split into child streams in a fixed order (the same
seed with and without a lesion gives bit-identical images outside it), and UIDs derive from the
seed (a dataset is reproducible byte for byte).
"""

from __future__ import annotations

from training.synth.basics import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LESION_TISSUES,
    ROLES,
    SC_IMAGE_STORAGE,
    TISSUE,
)
from training.synth.cylinder import CylinderPhantom, make_cylinder
from training.synth.dataset import LABEL_COLUMNS, main, write_dataset, write_stray
from training.synth.dicom import _available_syntaxes
from training.synth.lesions import HEMORRHAGE_SUBTYPES, INFARCT_SUBTYPES, LesionSpec
from training.synth.phantom import Phantom, make_phantom
from training.synth.render import pixel_points
from training.synth.study import write_study
from training.synth.truth import PATTERNS, STUDY_KINDS, StudyTruth, SynthOptions
from training.synth.vendors import _VENDORS, UNLISTED_KERNELS

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "HEMORRHAGE_SUBTYPES",
    "INFARCT_SUBTYPES",
    "LABEL_COLUMNS",
    "LESION_TISSUES",
    "PATTERNS",
    "ROLES",
    "SC_IMAGE_STORAGE",
    "STUDY_KINDS",
    "TISSUE",
    "UNLISTED_KERNELS",
    "_VENDORS",
    "CylinderPhantom",
    "LesionSpec",
    "Phantom",
    "StudyTruth",
    "SynthOptions",
    "_available_syntaxes",
    "main",
    "make_cylinder",
    "make_phantom",
    "pixel_points",
    "write_dataset",
    "write_stray",
    "write_study",
]

if __name__ == "__main__":
    raise SystemExit(main())
