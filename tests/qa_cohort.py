"""A tiny workflow output (records + masks + source T2s) for the blinded-reading tests.

The source T2 headers carry the participant id in every free-text field and in
an extension, as scanner exports sometimes do, so de-identification is tested
on real files.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.files import atomic_write_bytes, sha256_file
from khe_vol.nifti import mask_image, write_nifti
from tests.conftest import make_affine

SHAPE = (32, 28, 10)

#: A grid whose array axes are swapped and flipped against RAS (i -> -y, j -> -x):
#: what the viewer shows and what it saves must still be the same places in world space.
PERMUTED_FLIPPED = np.array([[0.0, -1.0, 0.0, 14.0], [-1.0, 0.0, 0.0, 16.0], [0.0, 0.0, 3.0, -15.0], [0, 0, 0, 1]])


def _ball(shape, affine, centre, radius):
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(xyz - np.asarray(centre), axis=1) <= radius).reshape(shape)


def write_t2(path, data, affine, participant_id, session_id):
    """A T2 whose header text fields and an extension name the participant."""
    img = nib.Nifti1Image(data.astype(np.int16), None)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header["descrip"] = f"{participant_id} {session_id} 2024-03-05".encode()
    img.header["aux_file"] = participant_id.encode()
    img.header["intent_name"] = participant_id.encode()
    img.header["db_name"] = participant_id.encode()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, f"patient {participant_id} 20240305".encode()))
    payload = bytearray(img.to_bytes())
    # Stored values are scaled (scl_slope 0.5, scl_inter 10) as scanners often
    # do; nibabel would fold scaling into its own choice on save, so the two
    # little-endian float32 header fields are set in the bytes directly.
    payload[112:120] = struct.pack("<ff", 0.5, 10.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(payload), mtime=0))
    return path


def write_cohort(root):
    """Write sources and workflow records; returns the record paths.

    sub-01 ses-baseline: ok (RAS grid). sub-01 ses-m06: ok, on a permuted,
    flipped grid. sub-02 ses-baseline: status error with a loadable image (a
    case without a proposed mask). sub-02 ses-m06: truncated image (no case).
    """
    root = Path(root)
    rng = np.random.default_rng(3)
    series = [
        ("sub-01", "ses-baseline", 0, make_affine((1.0, 1.0, 3.0), (-16, -14, -15)), 7.0, "ok"),
        ("sub-01", "ses-m06", 6, PERMUTED_FLIPPED, 5.0, "ok"),
        ("sub-02", "ses-baseline", 0, make_affine((1.0, 1.0, 3.0), (-16, -14, -15)), 6.0, "error"),
        ("sub-02", "ses-m06", 6, make_affine((1.0, 1.0, 3.0), (-16, -14, -15)), 6.0, "truncated"),
    ]
    records = []
    for pid, sid, month, affine, radius, kind in series:
        src = root / "imaging" / pid / sid / "anat" / f"{pid}_{sid}_T2w.nii.gz"
        inside = _ball(SHAPE, affine, (2.0, 1.0, 0.0), radius)
        data = 200 + 400 * inside + rng.normal(0, 8, SHAPE)
        write_t2(src, data, affine, pid, sid)
        if kind == "truncated":
            src.write_bytes(src.read_bytes()[:500])
        rec_dir = root / "results" / "work" / "series" / pid / sid
        record = {
            "participant_id": pid, "session_id": sid, "month": month, "status": "ok" if kind == "ok" else "error",
            "message": None, "method": "auto", "volume_ml": None, "source_file": str(src),
            "source_sha256": sha256_file(src), "shape": list(SHAPE), "affine": affine.tolist(),
        }
        if kind == "ok":
            record["volume_ml"] = float(inside.sum()) * 3.0 / 1000.0
            write_nifti(rec_dir / "mask.nii.gz", mask_image(inside, affine))
        else:
            record["message"] = f"{src}: no seed for {pid}" if kind == "error" else f"{src}: truncated"
            record["method"] = None
            atomic_write_bytes(rec_dir / "mask.nii.gz", b"")
        (rec_dir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(rec_dir / "record.json")
    return records


def write_phantom_cases(root, shape=(96, 96, 20), voxel_mm=(1.0, 1.0, 4.0), lesion_volume_ml=20.0):
    """Two baselines of a synthetic lesion with a bright fluid collection beside it, as workflow records.

    sub-01 ses-baseline had no seed (an error record, no mask): its case
    has no proposed mask and the reader seeds it. sub-02 ses-baseline is the
    same image with a proposed mask that took the fluid collection as well
    (the lesion from a reader's seed plus the fluid), for a reader to cut.

    Returns
    -------
    records : list of Path
    scene : dict
        ``seed_ras_mm`` (a reader's seed), ``fluid_deep_ras_mm`` (the
        fluid's deepest voxel centre), ``fluid_ras_mm`` (another fluid
        voxel centre on the same slice, > 6 mm away), ``proposed`` (the
        proposed mask), ``lesion_ml`` (true volume), all on the image grid;
        ``more_seeds_ras_mm`` (7 more places a reader might click in the lesion).
    """
    from scipy import ndimage

    from khe_vol.segmentation.seeded import segment_from_seed
    from khe_vol.synthetic.anatomy import make_anatomy
    from khe_vol.synthetic.render import render_labels, render_series
    from khe_vol.synthetic.seeds import phantom_reader_seeds
    from khe_vol.synthetic.specs import FLUID, SeriesSpec

    root = Path(root)
    anatomy = make_anatomy(3, lesion_volume_ml=lesion_volume_ml)
    spec = SeriesSpec(shape=shape, voxel_mm=voxel_mm, snr=18.0, bias_amplitude=0.2, rng_seed=5)
    phantom = render_series(anatomy, spec)
    affine = phantom.affine
    seed, *more_seeds = phantom_reader_seeds(anatomy, spec, phantom, np.random.default_rng(1), n_seeds=8)
    fluid = render_labels(anatomy, spec) == FLUID
    depth = ndimage.distance_transform_edt(fluid, sampling=spec.voxel_mm)
    deep = np.array(np.unravel_index(np.argmax(depth), depth.shape))
    same_slice = np.argwhere(fluid & (depth >= 2.0))
    same_slice = same_slice[same_slice[:, 2] == deep[2]]
    apart = same_slice[np.linalg.norm((same_slice - deep) * spec.voxel_mm, axis=1) > 6.0]
    other = apart[np.argmin(depth[tuple(apart.T)])]  # off the fluid's centre, as a reader would click
    seeded, _ = segment_from_seed(phantom.image, affine, seed)
    proposed = (seeded != 0) | fluid
    records = []
    for pid, mask in (("sub-01", None), ("sub-02", proposed)):
        src = root / "imaging" / pid / "ses-baseline" / "anat" / f"{pid}_ses-baseline_T2w.nii.gz"
        src.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(phantom.image.astype(np.float32), None)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        src.write_bytes(gzip.compress(img.to_bytes(), mtime=0))
        rec_dir = root / "results" / "work" / "series" / pid / "ses-baseline"
        record = {
            "participant_id": pid, "session_id": "ses-baseline", "month": 0, "status": "ok", "message": None,
            "method": "auto", "volume_ml": None, "source_file": str(src), "source_sha256": sha256_file(src),
            "shape": list(phantom.image.shape), "affine": affine.tolist(),
        }
        if mask is None:
            record.update(status="error", method=None, message=f"{src}: no seed for {pid}")
            atomic_write_bytes(rec_dir / "mask.nii.gz", b"")
        else:
            record["volume_ml"] = float(mask.sum()) * float(np.prod(voxel_mm)) / 1000.0
            write_nifti(rec_dir / "mask.nii.gz", mask_image(mask, affine))
        (rec_dir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(rec_dir / "record.json")
    to_mm = lambda ijk: affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]  # noqa: E731
    scene = {"seed_ras_mm": np.asarray(seed, float), "fluid_deep_ras_mm": to_mm(deep), "fluid_ras_mm": to_mm(other),
             "proposed": proposed, "lesion_ml": phantom.true_volume_ml, "more_seeds_ras_mm": np.asarray(more_seeds)}
    return records, scene
