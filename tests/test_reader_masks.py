"""Reader masks from ITK-SNAP (NIfTI) and 3D Slicer (.seg.nrrd) land at the right RAS+ positions.

Truth is a ball at a known RAS+ point. Files are written with pynrrd /
nibabel in their own frames (an LPS file gets LPS directions and origin
written by hand), and the loaded mask's centroid is checked in world
coordinates through the returned affine.
"""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
from conftest import make_affine, rotation, save_nifti

from khe_vol.geometry import resample_mask_to_grid, voxel_sizes_mm, voxel_to_world
from khe_vol.reader_masks import load_reader_mask, select_lesion_segment

CENTRE_RAS_MM = np.array([12.0, -30.0, 45.0])
RADIUS_MM = 9.0
SHAPE = (40, 36, 24)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def ras_grid():
    """Oblique RAS+ grid (0.9 x 1.1 x 1.6 mm) whose field of view holds the ball."""
    affine = make_affine((0.9, 1.1, 1.6), (0, 0, 0), rot=rotation("z", 25) @ rotation("x", -15))
    # Put the grid centre on the ball centre.
    affine[:3, 3] = CENTRE_RAS_MM - voxel_to_world((np.array(SHAPE) - 1) / 2, affine) + affine[:3, 3]
    return affine


def ball(shape, affine_ras, centre_ras=CENTRE_RAS_MM, radius_mm=RADIUS_MM):
    """uint8 ball of ``radius_mm`` around ``centre_ras`` (RAS+ mm) on a grid."""
    xyz = voxel_to_world(np.indices(shape).reshape(3, -1).T, affine_ras)
    return (np.linalg.norm(xyz - centre_ras, axis=1) <= radius_mm).reshape(shape).astype(np.uint8)


def centroid_ras(mask, affine):
    return voxel_to_world(np.argwhere(mask).mean(axis=0), affine)


def assert_ball_at_centre(mask, affine):
    half_voxel = voxel_sizes_mm(affine).max() / 2
    assert np.linalg.norm(centroid_ras(mask, affine) - CENTRE_RAS_MM) < half_voxel
    # Volume right to within a few percent: the voxel size was read correctly.
    volume = mask.sum() * abs(np.linalg.det(affine[:3, :3]))
    assert volume == pytest.approx(4 / 3 * np.pi * RADIUS_MM**3, rel=0.05)


def nrrd_header(affine_world, space, **extra):
    """pynrrd header for a 3D grid whose voxel -> ``space`` affine is given."""
    return {
        "space": space,
        "space directions": affine_world[:3, :3].T,  # one row per array axis
        "space origin": affine_world[:3, 3],
        "kinds": ["domain"] * 3,
        **extra,
    }


@pytest.mark.parametrize("encoding", ["gzip", "raw"])
def test_slicer_lps_seg_nrrd_lands_at_ras_point(tmp_path, encoding):
    affine_ras = ras_grid()
    affine_lps = LPS_TO_RAS @ affine_ras
    truth = ball(SHAPE, affine_ras)
    header = nrrd_header(affine_lps, "left-posterior-superior", encoding=encoding,
                         Segment0_ID="Segment_1", Segment0_Name="Lesion", Segment0_LabelValue="1", Segment0_Layer="0")
    path = tmp_path / "reader.seg.nrrd"
    nrrd.write(str(path), truth, header, index_order="F")
    mask, affine = load_reader_mask(path)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, truth)
    np.testing.assert_allclose(affine, affine_ras, atol=1e-9)
    assert_ball_at_centre(mask, affine)


def test_slicer_ras_space_and_plain_label_nrrd(tmp_path):
    # A RAS-space NRRD label map (label 3 for lesion, 5 elsewhere) with flipped axes.
    affine_ras = make_affine((1.2, 1.2, 2.0), (0, 0, 0), rot=rotation("y", 10), flips=(-1, 1, -1))
    affine_ras[:3, 3] = CENTRE_RAS_MM - voxel_to_world((np.array(SHAPE) - 1) / 2, affine_ras) + affine_ras[:3, 3]
    labels = 3 * ball(SHAPE, affine_ras)
    labels[0:3, 0:3, 0:3] = 5
    path = tmp_path / "labels.nrrd"
    nrrd.write(str(path), labels.astype(np.int16), nrrd_header(affine_ras, "RAS"), index_order="F")
    mask, affine = load_reader_mask(path, label=3)
    np.testing.assert_allclose(affine, affine_ras, atol=1e-9)
    assert_ball_at_centre(mask, affine)
    every_label, _ = load_reader_mask(path)  # default: all non-zero
    assert every_label.sum() == mask.sum() + 27


def test_layered_seg_nrrd_selects_lesion_segment(tmp_path):
    affine_ras = ras_grid()
    lesion = ball(SHAPE, affine_ras)
    # A vessel overlapping the lesion: why Slicer puts it in another layer.
    vessel = ball(SHAPE, affine_ras, centre_ras=CENTRE_RAS_MM + [6, 0, 0], radius_mm=4)
    layers = np.stack([2 * vessel, lesion]).astype(np.uint8)  # vessel value 2 in layer 0, lesion value 1 in layer 1
    directions = np.vstack([np.full(3, np.nan), (LPS_TO_RAS @ affine_ras)[:3, :3].T])
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,  # written as "none (..) (..) (..)"
        "space origin": (LPS_TO_RAS @ affine_ras)[:3, 3],
        "kinds": ["list", "domain", "domain", "domain"],
        "encoding": "gzip",
        "Segment0_Name": "vessel", "Segment0_LabelValue": "2", "Segment0_Layer": "0",
        "Segment1_Name": "lesion", "Segment1_LabelValue": "1", "Segment1_Layer": "1",
    }
    path = tmp_path / "layers.seg.nrrd"
    nrrd.write(str(path), layers, header, index_order="F")
    assert "none" in path.read_bytes()[:2000].decode("latin-1")
    mask, affine = load_reader_mask(path)
    np.testing.assert_array_equal(mask, lesion)
    assert_ball_at_centre(mask, affine)
    vessel_mask, _ = load_reader_mask(path, label="VESSEL")
    np.testing.assert_array_equal(vessel_mask, vessel)


def test_lps_seg_nrrd_and_equivalent_nifti_agree(tmp_path):
    affine_ras = ras_grid()
    truth = ball(SHAPE, affine_ras)
    seg = tmp_path / "slicer.seg.nrrd"
    nrrd.write(str(seg), truth, nrrd_header(LPS_TO_RAS @ affine_ras, "left-posterior-superior"), index_order="F")
    nii = save_nifti(tmp_path / "itksnap.nii.gz", truth * 7, affine_ras)  # ITK-SNAP label 7
    mask_seg, affine_seg = load_reader_mask(seg)
    mask_nii, affine_nii = load_reader_mask(nii)
    np.testing.assert_array_equal(mask_seg, mask_nii)
    np.testing.assert_allclose(affine_seg, affine_nii, atol=1e-5)  # NIfTI stores float32
    assert_ball_at_centre(mask_nii, affine_nii)


def test_nifti_label_choice(tmp_path):
    affine_ras = ras_grid()
    labels = ball(SHAPE, affine_ras) + 2 * ball(SHAPE, affine_ras, CENTRE_RAS_MM + [0, 0, 15], 3)
    path = save_nifti(tmp_path / "m.nii.gz", labels.astype(np.int16), affine_ras)
    lesion, affine = load_reader_mask(path, label=1)
    assert_ball_at_centre(lesion, affine)
    assert load_reader_mask(path)[0].sum() == np.count_nonzero(labels)
    with pytest.raises(ValueError, match=r"m\.nii\.gz.*label 4 is not in the mask.*\[1, 2\]"):
        load_reader_mask(path, label=4)


def test_resampled_onto_differently_oriented_series_grid(tmp_path):
    """How the workflow uses a reader mask: loaded, then moved onto the series grid."""
    affine_ras = ras_grid()
    path = tmp_path / "slicer.seg.nrrd"
    nrrd.write(str(path), ball(SHAPE, affine_ras), nrrd_header(LPS_TO_RAS @ affine_ras, "LPS"), index_order="F")
    mask, affine = load_reader_mask(path)
    # Series: axial-ish, permuted and flipped axes, other voxel sizes.
    series_shape = (30, 50, 44)
    series_affine = np.eye(4)
    series_affine[:3, :3] = rotation("x", 90) @ np.array([[0, 0, -1.0], [1.0, 0, 0], [0, 0.8, 0]])
    series_affine[:3, 3] = CENTRE_RAS_MM - voxel_to_world((np.array(series_shape) - 1) / 2, series_affine) + series_affine[:3, 3]
    on_series = resample_mask_to_grid(mask, affine, series_shape, series_affine)
    assert_ball_at_centre(on_series, series_affine)
    truth = ball(series_shape, series_affine).astype(bool)
    dice = 2 * np.sum(truth & (on_series == 1)) / (truth.sum() + on_series.sum())
    assert dice > 0.9


def seg_file(tmp_path, header_changes, data=None, name="bad.seg.nrrd"):
    affine_ras = ras_grid()
    header = nrrd_header(LPS_TO_RAS @ affine_ras, "left-posterior-superior")
    header.update(header_changes)
    header = {k: v for k, v in header.items() if v is not None}
    path = tmp_path / name
    nrrd.write(str(path), ball(SHAPE, affine_ras) if data is None else data, header, index_order="F")
    return path


@pytest.mark.parametrize(
    ("changes", "data", "message"),
    [
        ({"space": "scanner-xyz"}, None, r"unknown NRRD space 'scanner-xyz'"),
        ({"space": None, "space directions": None, "space origin": None, "spacings": [1.0, 1.0, 1.0]}, None, r"no 'space' field"),
        ({"space directions": None, "space origin": None}, None, r"no 'space directions'"),
        ({}, np.zeros(SHAPE, np.uint8), r"mask is empty"),
        ({}, np.full(SHAPE, 0.5, np.float32), r"non-integer values"),
    ],
)
def test_clear_errors_name_file_and_problem(tmp_path, changes, data, message):
    path = seg_file(tmp_path, changes, data)
    with pytest.raises(ValueError, match=rf"bad\.seg\.nrrd: .*{message}"):
        load_reader_mask(path)


def test_layered_file_without_segments_is_refused(tmp_path):
    affine_lps = LPS_TO_RAS @ ras_grid()
    header = {
        "space": "left-posterior-superior",
        "space directions": np.vstack([np.full(3, np.nan), affine_lps[:3, :3].T]),
        "space origin": affine_lps[:3, 3],
        "kinds": ["list", "domain", "domain", "domain"],
    }
    path = tmp_path / "bad.seg.nrrd"
    nrrd.write(str(path), np.stack([ball(SHAPE, ras_grid())] * 2), header, index_order="F")
    with pytest.raises(ValueError, match=r"bad\.seg\.nrrd: 4D layered segmentation with no Segment"):
        load_reader_mask(path)


def test_select_lesion_segment():
    def seg(name, i=0):
        return {"index": i, "name": name, "label_value": i + 1, "layer": 0}

    assert select_lesion_segment([seg("vessel"), seg("KHE Lesion", 1)])["name"] == "KHE Lesion"
    assert select_lesion_segment([seg("lesion 2"), seg("Lesion", 1)])["name"] == "Lesion"
    assert select_lesion_segment([seg("Segment_1")])["name"] == "Segment_1"
    with pytest.raises(ValueError, match=r"no segment named like 'lesion' among 'vessel', 'bone'"):
        select_lesion_segment([seg("vessel"), seg("bone", 1)], "x.seg.nrrd")
    with pytest.raises(ValueError, match=r"several segments are named like 'lesion'"):
        select_lesion_segment([seg("lesion a"), seg("lesion b", 1)])
    with pytest.raises(ValueError, match=r"no segments"):
        select_lesion_segment([])


def test_several_segments_without_lesion_is_refused(tmp_path):
    path = seg_file(tmp_path, {"Segment0_Name": "vessel", "Segment0_LabelValue": "1",
                               "Segment1_Name": "bone", "Segment1_LabelValue": "2"})
    with pytest.raises(ValueError, match=r"bad\.seg\.nrrd: no segment named like 'lesion' among 'vessel', 'bone'"):
        load_reader_mask(path)
    # Asking for one by name or value works.
    assert load_reader_mask(path, label="vessel")[0].any()
    assert load_reader_mask(path, label=1)[0].any()
