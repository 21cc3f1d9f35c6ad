"""Shared helpers: real NIfTI files written to tmp dirs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def save_nifti(path, data, affine, qform_code=1, sform_code=1):
    """Write ``data`` with ``affine`` as a real NIfTI file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(affine, dtype=float)
    # No affine at construction: nibabel would decompose it into a qform,
    # which fails for the singular affines some tests need on disk.
    img = nib.Nifti1Image(np.asarray(data), None)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine if qform_code else None, code=qform_code)
    nib.save(img, path)
    return path


def rotation(axis, degrees):
    """A 3x3 rotation about x, y or z."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(zooms, origin, rot=np.eye(3), flips=(1, 1, 1)):
    """Affine with voxel sizes ``zooms`` (mm), rotation and axis flips."""
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.asarray(zooms, float) * np.asarray(flips, float))
    a[:3, 3] = origin
    return a


@pytest.fixture
def ball_series(tmp_path):
    """A 40x40x12 series (1x1x3 mm) with a bright ball of radius 8 mm at the world origin."""
    affine = make_affine((1, 1, 3), (-20, -20, -18))
    ijk = np.indices((40, 40, 12)).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    inside = (np.linalg.norm(xyz, axis=1) <= 8).reshape(40, 40, 12)
    rng = np.random.default_rng(1)
    data = (100 + 200 * inside + rng.normal(0, 5, inside.shape)).astype(np.float32)
    path = save_nifti(tmp_path / "ball_T2w.nii.gz", data, affine)
    return path, data, affine, inside
