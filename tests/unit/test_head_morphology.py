"""The head mask's in-plane opening runs in scipy (4x faster than SimpleITK's on the coarse grid) and
must stay ITK's opening voxel for voxel: the head found, and so the canonical grid, depend on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from triage.assemble.head import _itk_ball, binary_opening_itk


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
