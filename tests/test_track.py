"""Follow-ups stored on another intensity scale than their reference (issue 11, item 2).

Sessions of a trial come from different scanners, software versions and
preprocessing: a follow-up may store its intensities with a gain and an
offset, inverted, z-scored, or as int16 with scl_slope / scl_inter; the
baseline may be z-scored and the follow-ups not. Every test below writes
real NIfTI files from :mod:`khe_vol.synthetic` and measures them through the
workflow's per-series path (:func:`khe_vol.series.measure_series`): the
volume must be that of the follow-up stored plainly, and the review flag
``intensity_scale_differs`` set exactly where :func:`khe_vol.segmentation.track.working_scale`
says the scale is not a plain positive rescaling.
"""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.render import lesion_fits_fov, render_labels, render_series, series_affine
from khe_vol.synthetic.specs import LESION, LESION_LABELS, SeriesSpec
from khe_vol.geometry import voxel_sizes_mm, voxel_to_world
from khe_vol.segmentation.intensity import itk_threads
from khe_vol.series import measure_series
from khe_vol.segmentation.track import OFFSET_TOLERANCE, register_rigid, track_followup

SPEC = SeriesSpec(shape=(112, 112, 24), voxel_mm=(1.0, 1.0, 4.0), snr=18.0, bias_amplitude=0.3, rng_seed=5)
FOLLOW = dict(rotation_deg=(3.0, -2.0, 4.0), translation_mm=(5.0, -4.0, 9.0), rng_seed=21)
#: Unchanged, shrunk by about half, vanished.
RATIOS = (1.0, 0.5, 0.0)


def zscored(x):
    x = np.asarray(x, np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def write(path, data, affine, slope=None, inter=None):
    """A real NIfTI file; with ``slope``, int16 data with that scl_slope / scl_inter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if slope is None:
        img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    else:
        raw = np.round((np.asarray(data, np.float64) - inter) / slope)
        assert -32768 <= raw.min() and raw.max() <= 32767, "the test's values must fit int16"
        img = nib.Nifti1Image(raw.astype(np.int16), affine)
        img.header.set_slope_inter(slope, inter)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    if slope is not None:  # the file really carries that scaling
        assert (nib.load(path).dataobj.slope, nib.load(path).dataobj.inter) == pytest.approx((slope, inter))
    return path


#: How a follow-up is stored: name -> (stored data from the plain image, write kwargs), and whether
#: it is a plain positive rescaling of the plainly stored baseline (no review flag).
STORAGE = {
    "gain3_offset500": (lambda x: 3.0 * x + 500.0, {}, False),
    "negated": (lambda x: -x, {}, False),
    "zscored": (zscored, {}, False),
    # real value = 0.01 * int - 100: the phantom's 0..~450 halved to fit int16
    "int16_scl_slope": (lambda x: 0.5 * x - 100.0, {"slope": 0.01, "inter": -100.0}, False),
    "gain2": (lambda x: 2.0 * x, {}, True),  # a plain rescaling: same volume, no flag
}
#: (storage, ratio) pairs tested: every storage at every ratio, the plain rescaling once.
CASES = [(s, r) for s in sorted(STORAGE) if s != "gain2" for r in RATIOS] + [("gain2", 0.5)]


def reader_seed_ras_mm(anatomy, spec, rng):
    """A seed where a reader might click: bright lesion tissue >= 3 mm inside the boundary, not its centre."""
    labels = render_labels(anatomy, spec)
    depth_mm = ndimage.distance_transform_edt(np.isin(labels, LESION_LABELS), sampling=spec.voxel_mm)
    candidates = np.argwhere((labels == LESION) & (depth_mm >= 3.0) & (depth_mm < 0.6 * depth_mm.max()))
    assert len(candidates) > 20
    ijk = candidates[rng.integers(len(candidates))]
    return voxel_to_world(ijk, series_affine(anatomy, spec))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Baseline (plain and z-scored) measured from a reader's seed, and the plain follow-ups' volumes."""
    root = tmp_path_factory.mktemp("scales")
    anatomy = make_anatomy(3, lesion_volume_ml=30.0)
    assert lesion_fits_fov(anatomy, SPEC)
    base = render_series(anatomy, SPEC)
    seed = reader_seed_ras_mm(anatomy, SPEC, np.random.default_rng(11))
    refs = {}
    for name, data in (("plain", base.image), ("zscored", zscored(base.image))):
        path = write(root / f"base_{name}_T2w.nii.gz", data, base.affine)
        record, mask, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
        assert record["status"] == "ok", record["message"]
        refs[name] = {"record": record, "mask": mask}
    follow = {}
    for ratio in RATIOS:
        ph_f = render_series(anatomy, replace(SPEC, volume_ratio=ratio, **FOLLOW))
        path = write(root / f"follow_{ratio}_plain_T2w.nii.gz", ph_f.image, ph_f.affine)
        record, mask, _ = measure_series("sub-01", "ses-m06", 6, path, reference=refs["plain"])
        assert record["status"] == "ok", record["message"]
        assert [r["reason"] for r in record["review"]] == []
        follow[ratio] = {"phantom": ph_f, "record": record, "mask": mask}
    # The plain follow-ups themselves are right: the comparisons below are with a real answer.
    assert follow[1.0]["record"]["volume_ml"] == pytest.approx(follow[1.0]["phantom"].true_volume_ml, rel=0.08)
    assert follow[0.5]["record"]["volume_ml"] == pytest.approx(follow[0.5]["phantom"].true_volume_ml, rel=0.12)
    assert follow[0.0]["record"]["n_voxels"] == 0
    return root, refs, follow


def assert_same_volume(record, plain_record):
    assert record["status"] == "ok", record["message"]
    if plain_record["n_voxels"] == 0:
        assert record["n_voxels"] == 0 and record["volume_ml"] == 0.0
    else:
        assert record["volume_ml"] == pytest.approx(plain_record["volume_ml"], rel=0.02)


@pytest.mark.parametrize(("storage", "ratio"), CASES)
def test_followup_on_another_scale_measures_as_stored_plainly(study, storage, ratio):
    root, refs, follow = study
    make, kwargs, plain = STORAGE[storage]
    ph_f = follow[ratio]["phantom"]
    path = write(root / f"follow_{ratio}_{storage}_T2w.nii.gz", make(ph_f.image), ph_f.affine, **kwargs)
    record, mask, _ = measure_series("sub-01", "ses-m06", 6, path, reference=refs["plain"])
    assert_same_volume(record, follow[ratio]["record"])
    reasons = [r["reason"] for r in record["review"]]
    assert reasons == ([] if plain else ["intensity_scale_differs"])
    mapping = record["details"]["intensity_map"]
    assert mapping["plain_rescaling"] is plain
    if storage == "negated":
        assert mapping["gain"] < 0 and "inverted" in record["review"][0]["detail"]
    json.dumps(record)


@pytest.mark.parametrize("ratio", RATIOS)
def test_zscored_baseline_with_plain_followups(study, ratio):
    _, refs, follow = study
    plain = follow[ratio]["record"]
    record, _, _ = measure_series("sub-01", "ses-m06", 6, plain["source_file"], reference=refs["zscored"])
    assert_same_volume(record, plain)
    assert [r["reason"] for r in record["review"]] == ["intensity_scale_differs"]
    assert "the reference has negative values and this series none" in record["review"][0]["detail"]


def test_mutual_information_registers_an_inverted_followup(study):
    """The registration of a negated follow-up is that of the plain one (the lesion lands in the same place)."""
    _, refs, follow = study
    ph_f = follow[0.5]["phantom"]
    base = nib.load(refs["plain"]["record"]["source_file"])
    ref_image, ref_affine = np.asarray(base.dataobj, np.float32), base.affine
    plain = register_rigid(ref_image, ref_affine, ph_f.image, ph_f.affine)[1]
    inverted = register_rigid(ref_image, ref_affine, -ph_f.image, ph_f.affine)[1]
    centre = np.append(ph_f.seed_ras_mm, 1.0)
    moved = [np.asarray(info["fixed_to_moving_ras"]) @ centre for info in (plain, inverted)]
    assert np.linalg.norm(moved[0][:3] - moved[1][:3]) < 1.0


def test_plain_followups_stay_within_the_offset_tolerance(study):
    """Unscaled sessions (other bias field, noise, lesion size) are recognised as the same scale."""
    _, _, follow = study
    for item in follow.values():
        mapping = item["record"]["details"]["intensity_map"]
        assert mapping["gain"] > 0 and mapping["offset_share"] < 0.5 * OFFSET_TOLERANCE
        assert mapping["working_scale"] == "stored"


def test_rescaled_followup_is_the_same_bytes_on_any_thread_count(study):
    _, refs, follow = study
    ph_f = follow[0.5]["phantom"]
    stored = 3.0 * ph_f.image + 500.0
    base = nib.load(refs["plain"]["record"]["source_file"])
    ref_image, ref_mask = np.asarray(base.dataobj, np.float32), refs["plain"]["mask"]
    runs = []
    for threads in (1, 3):
        with itk_threads(threads):
            mask, info = track_followup(stored, ph_f.affine, ref_image, base.affine, ref_mask)
        info.pop("seconds")
        runs.append((mask.tobytes(), json.dumps(info, sort_keys=True)))
    assert runs[0] == runs[1]
    assert voxel_sizes_mm(ph_f.affine)[2] == 4.0  # the thick-slice grid of the plain follow-up
