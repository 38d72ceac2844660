"""synth: synthetic head-CT studies written as DICOM, the ground truth the tests and experiments use.

The public names live in small modules (see :mod:`training.synth.head` for the map) and are
re-exported here: ``from training.synth import SynthOptions, write_dataset, write_study``.
"""

from training.synth.dataset import LABEL_COLUMNS, main, write_dataset, write_stray
from training.synth.phantom import Phantom, make_phantom
from training.synth.render import pixel_points
from training.synth.study import write_study
from training.synth.truth import PATTERNS, STUDY_KINDS, StudyTruth, SynthOptions

__all__ = [
    "LABEL_COLUMNS",
    "PATTERNS",
    "STUDY_KINDS",
    "Phantom",
    "StudyTruth",
    "SynthOptions",
    "main",
    "make_phantom",
    "pixel_points",
    "write_dataset",
    "write_stray",
    "write_study",
]
