"""Every kind of bad input gives a clear error naming the file and the problem."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from khe_vol.nifti import SeriesError, load_series, mask_image, nifti_bytes, write_nifti
from tests.conftest import make_affine, save_nifti

GOOD = make_affine((0.8, 0.8, 4), (-40, -40, -40))


def _expect(path, pattern):
    with pytest.raises(SeriesError) as info:
        load_series(path)
    assert str(path) in str(info.value)
    assert pattern in str(info.value)


def test_good_series_and_singleton_4d(tmp_path):
    data = np.random.default_rng(0).random((8, 9, 5)).astype(np.float32)
    s = load_series(save_nifti(tmp_path / "a.nii.gz", data, GOOD))
    assert s.data.shape == (8, 9, 5) and np.allclose(s.affine, GOOD) and s.affine_source == "sform"
    s4 = load_series(save_nifti(tmp_path / "b.nii", data[..., None], GOOD))
    assert s4.data.shape == (8, 9, 5)


def test_qform_used_when_sform_unset(tmp_path):
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    s = load_series(save_nifti(tmp_path / "q.nii.gz", data, GOOD, qform_code=1, sform_code=0))
    assert s.affine_source == "qform" and np.allclose(s.affine, GOOD)


def test_missing_empty_foreign_truncated(tmp_path):
    _expect(tmp_path / "missing.nii.gz", "does not exist")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    _expect(empty, "empty (0 bytes)")
    text = tmp_path / "notes.nii"
    text.write_text("this is not an image\n" * 50)
    _expect(text, "not a readable NIfTI")
    good = save_nifti(tmp_path / "full.nii.gz", np.random.default_rng(0).random((40, 40, 20)).astype(np.float32), GOOD)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect(cut, "truncated")


def test_4d_nan_blank(tmp_path):
    _expect(save_nifti(tmp_path / "4d.nii.gz", np.ones((4, 4, 4, 3), np.float32), GOOD), "3 volumes")
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    _expect(save_nifti(tmp_path / "nan.nii.gz", nan, GOOD), "1 voxel(s) are NaN")
    _expect(save_nifti(tmp_path / "blank.nii.gz", np.zeros((4, 4, 4), np.float32), GOOD), "blank")


def test_bad_affines(tmp_path):
    data = np.random.default_rng(0).random((4, 4, 4)).astype(np.float32)
    singular = GOOD.copy()
    singular[:3, 2] = 0
    _expect(save_nifti(tmp_path / "sing.nii.gz", data, singular, qform_code=0), "singular")
    _expect(save_nifti(tmp_path / "nocode.nii.gz", data, GOOD, qform_code=0, sform_code=0), "no scanner orientation")
    huge = make_affine((0.8, 0.8, 80), (0, 0, 0))
    _expect(save_nifti(tmp_path / "huge.nii.gz", data, huge), "implausible voxel size")


def test_input_never_modified(tmp_path):
    path = save_nifti(tmp_path / "a.nii.gz", np.random.default_rng(0).random((5, 5, 5)).astype(np.float32), GOOD)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    load_series(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_mask_writing_is_reproducible_and_on_grid(tmp_path):
    mask = np.zeros((6, 7, 3), np.uint8)
    mask[2:4, 1:5, 1] = 1
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    write_nifti(a, mask_image(mask, GOOD))
    write_nifti(b, mask_image(mask, GOOD))
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes()) == mask_image(mask, GOOD).to_bytes()
    img = nib.load(a)
    assert img.get_data_dtype() == np.uint8 and np.allclose(img.affine, GOOD)
    assert np.array_equal(np.asarray(img.dataobj), mask)
    assert nifti_bytes(mask_image(mask, GOOD)) == a.read_bytes()
