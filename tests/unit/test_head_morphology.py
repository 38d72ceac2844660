"""The head mask's in-plane opening runs in scipy (4x faster than SimpleITK's on the coarse grid) and
must stay ITK's opening voxel for voxel: the head found, and so the canonical grid, depend on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from triage.assemble.head import HEAD_DILATION, _dilated_near, _itk_ball, binary_opening_itk


def _itk_opening(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryMorphologicalOpening(img, list(radius), sitk.sitkBall, 0, 1)) > 0


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for density in (0.3, 0.5, 0.7):  # blobs touching every face of the grid (the border rule matters)
        out.append(ndimage.gaussian_filter(rng.random((12, 40, 36)), 1.5) > 1 - density)
    out.append(rng.random((6, 20, 20)) > 0.5)  # salt and pepper: every local configuration
    out.append(np.ones((4, 9, 9), bool))  # all tissue: the image border must not erode it
    out.append(np.zeros((4, 9, 9), bool))
    line = np.zeros((3, 15, 15), bool)
    line[:, 7, :] = True  # a thin table top: cut by the opening
    line[:, 2:6, 2:12] = True
    out.append(line)
    return out


@pytest.mark.parametrize("radius", [(2, 2, 0), (1, 1, 1), (3, 2, 1)])
def test_opening_is_itks_voxel_for_voxel(radius: tuple[int, int, int]) -> None:
    for i, mask in enumerate(_masks()):
        assert np.array_equal(binary_opening_itk(mask, radius), _itk_opening(mask, radius)), f"mask {i}"


def test_the_ball_is_itks() -> None:
    ball = _itk_ball((2, 2, 0))
    assert ball.shape == (1, 5, 5) and int(ball.sum()) == 21  # the 5 x 5 square without its corners
    assert not ball[0, 0, 0] and ball[0, 2, 0] and ball[0, 2, 2]


def _whole_grid_then_sampled(labels: np.ndarray, coarse: sitk.Image, origin: list[float],
                             spacing: list[float], size: list[int]) -> np.ndarray:
    """The head finder's footprint as it was: the whole coarse grid dilated, then sampled."""
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.CopyInformation(coarse)
    img = sitk.BinaryDilate(img, list(HEAD_DILATION), sitk.sitkBall, 0, 1)
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    return sitk.GetArrayFromImage(sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin,
                                                spacing, identity, 0))


def test_dilating_only_near_the_top_samples_what_the_whole_grid_gives() -> None:
    """The crop (`_dilated_near`) must not change one sampled voxel: blobs touching every face, fine
    grids inside, straddling every edge of and beyond the coarse grid, off the coarse voxel centres."""
    rng = np.random.default_rng(3)
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    for trial in range(12):
        labels = ndimage.gaussian_filter(rng.random((30, 44, 40)), 1.2) > 0.55
        coarse = sitk.Image(40, 44, 30, sitk.sitkUInt8)
        coarse.SetSpacing((1.72, 1.72, 2.25))
        coarse.SetOrigin((-30.0, 12.5, -70.0))
        lo = np.asarray(coarse.GetOrigin()) + rng.uniform(-15, 60, 3) * np.array([1.72, 1.72, 2.25])
        spacing = [1.72, 1.72, 0.5]
        size = [int(rng.integers(5, 35)), int(rng.integers(5, 35)), int(rng.integers(20, 161))]
        origin = (lo + (0 if trial % 2 else rng.uniform(-0.9, 0.9, 3))).tolist()
        near = _dilated_near(labels, coarse, origin, spacing, size)
        got = sitk.GetArrayFromImage(sitk.Resample(near, size, sitk.Transform(), sitk.sitkNearestNeighbor,
                                                   origin, spacing, identity, 0))
        want = _whole_grid_then_sampled(labels, coarse, origin, spacing, size)
        assert np.array_equal(got, want), f"trial {trial}: {int((got != want).sum())} voxels differ"
        assert near.GetSize()[2] <= coarse.GetSize()[2]
