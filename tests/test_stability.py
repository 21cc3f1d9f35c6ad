"""One scan, one volume (issue 22): a measurement does not move when only the header's precision does.

The DICOM demo's participant 01 (the README's worked example) is written as a site writes it
(int16 + scl_slope, :func:`khe_vol.synthetic.dicom.direct_nifti`) and measured through the
workflow's per-series path: seeded baseline, tracked m06. Its m06 once measured 12.4 or 18.7 mL
depending on a change of 1e-4 mm in the slice step (N4 was fitted on voxels SimpleITK's
``Shrink`` picked by rounding physical positions, and the fluid beside the lesion then joined it).
The whole worked example, run as the README says, gets both categories right.
"""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from khe_vol.series import measure_series
from khe_vol.synthetic.demo import true_category
from khe_vol.synthetic.dicom import DICOM_DEMO_PARTICIPANTS, DICOM_DEMO_VISITS, direct_nifti, small_phantom, stored_values
from khe_vol.synthetic.seeds import reader_seeds_ras_mm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_participant_01(tmp_path_factory):
    """sub-01 of ``khe-vol demo --dicom`` as NIfTI: {session: (stored, slope, affine, true mL)} and its seed."""
    pid, _storage, orientation, oblique_deg = DICOM_DEMO_PARTICIPANTS[0]
    sessions, seed = {}, None
    for session, volume_ml, _date in DICOM_DEMO_VISITS:
        phantom = small_phantom(rng_seed=int(pid), orientation=orientation, oblique_deg=oblique_deg,
                                shape=(96, 96, 20), voxel_mm=(1.0, 1.0, 3.0), lesion_volume_ml=volume_ml)
        stored, slope, _ = stored_values(phantom.image)
        sessions[session] = (stored, slope, np.asarray(phantom.affine, float), phantom.true_volume_ml)
        if session == "baseline":
            seed = reader_seeds_ras_mm(phantom.truth_mask, phantom.affine, np.random.default_rng(5))[0]
    return tmp_path_factory.mktemp("dicom_demo_01"), sessions, [round(float(v), 2) for v in seed]


def measure_chain(folder, sessions, seed, affines=None):
    """Baseline from the seed, m06 tracked from it; ``affines`` replaces a session's affine."""
    records = {}
    reference = None
    for session, (stored, slope, affine, _) in sessions.items():
        path = direct_nifti(folder / f"{session}_{len(list(folder.iterdir()))}_T2w.nii.gz", stored, slope, 0.0,
                            (affines or {}).get(session, affine))
        if reference is None:
            record, mask, _ = measure_series("sub-01", f"ses-{session}", 0, path, seed_ras_mm=seed)
            reference = {"record": record, "mask": mask}
        else:
            record, _, _ = measure_series("sub-01", f"ses-{session}", 6, path, reference=reference)
        assert record["status"] == "ok", record["message"]
        records[session] = record
    return records


def test_slice_step_moved_by_1e4_mm_leaves_the_tracked_volume(demo_participant_01):
    folder, sessions, seed = demo_participant_01
    unmoved = measure_chain(folder, sessions, seed)["m06"]["volume_ml"]
    for step_mm in (1e-4, -1e-4):
        affine = sessions["m06"][2].copy()
        affine[2, 2] += step_mm
        moved = measure_chain(folder, sessions, seed, {"m06": affine})["m06"]["volume_ml"]
        assert moved == pytest.approx(unmoved, rel=0.01), (step_mm, moved, unmoved)
    # ...and it is the lesion, not the lesion with the fluid beside it (true 12.0 mL, that was 18.7).
    assert unmoved == pytest.approx(sessions["m06"][3], rel=0.06)


def test_sform_only_qform_only_and_reversed_storage_give_one_baseline_volume(demo_participant_01):
    """The same voxels under an sform alone, a qform alone (a quaternion: the affine to float
    precision) and with an array axis reversed measure one volume."""
    import nibabel as nib

    folder, sessions, seed = demo_participant_01
    stored, slope, affine, _ = sessions["baseline"]
    volumes = {}
    for name in ("sform", "qform", "reversed"):
        data, aff = (stored[::-1].copy(), affine @ np.array([[-1, 0, 0, stored.shape[0] - 1], [0, 1, 0, 0],
                                                              [0, 0, 1, 0], [0, 0, 0, 1.0]])) \
            if name == "reversed" else (stored, affine)
        img = nib.Nifti1Image(data, None)
        img.header.set_slope_inter(slope, 0.0)
        if name == "qform":
            img.set_qform(aff, code=1)
            img.set_sform(None, code=0)
        else:
            img.set_sform(aff, code=1)
            img.set_qform(None, code=0)
        path = folder / f"{name}_T2w.nii.gz"
        nib.save(img, path)
        record, _, _ = measure_series("sub-01", "ses-baseline", 0, path, seed_ras_mm=seed)
        assert record["status"] == "ok", record["message"]
        assert record["affine_source"] == ("qform" if name == "qform" else "sform")
        volumes[name] = record["volume_ml"]
    assert max(volumes.values()) == pytest.approx(min(volumes.values()), rel=1e-3), volumes


def test_a_followup_reusing_its_baselines_reference_model_gives_the_same_record(demo_participant_01):
    """The baseline job computes what tracking needs of its lesion once; a follow-up given it
    writes the same record as one that computes it again."""
    folder, sessions, seed = demo_participant_01
    stored, slope, affine, _ = sessions["baseline"]
    baseline, mask, _ = measure_series("sub-01", "ses-baseline", 0,
                                       direct_nifti(folder / "b_T2w.nii.gz", stored, slope, 0.0, affine),
                                       seed_ras_mm=seed)
    assert "mask_sha256" in baseline["details"]["reference_model"]
    stored, slope, affine, _ = sessions["m06"]
    path = direct_nifti(folder / "f_T2w.nii.gz", stored, slope, 0.0, affine)
    reused, reused_mask, _ = measure_series("sub-01", "ses-m06", 6, path, reference={"record": baseline, "mask": mask})
    bare = copy.deepcopy(baseline)
    del bare["details"]["reference_model"]
    again, again_mask, _ = measure_series("sub-01", "ses-m06", 6, path, reference={"record": bare, "mask": mask})
    assert reused == again and np.array_equal(reused_mask, again_mask)
    # A model of another lesion (an edited mask) is not used: the follow-up computes its own.
    edited = mask.copy()
    edited[tuple(np.argwhere(mask)[0])] = 0
    other, _, _ = measure_series("sub-01", "ses-m06", 6, path, reference={"record": baseline, "mask": edited})
    assert other["details"]["reference_model"] != {k: v for k, v in baseline["details"]["reference_model"].items()
                                                    if k != "mask_sha256"}


@pytest.mark.slow
def test_the_readme_worked_example_gets_both_categories_right(tmp_path):
    """`khe-vol demo dicom_demo --dicom`, the import and the workflow, as the README runs them."""
    def run(*cmd, cwd):
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    khe_vol = [sys.executable, "-m", "khe_vol.cli"]
    run(*khe_vol, "demo", "dicom_demo", "--dicom", cwd=tmp_path)
    demo = tmp_path / "dicom_demo"
    run(*khe_vol, "import", "site_export/", "--out", "study/imaging", "--visits", "visits.tsv", "--config",
        "study.yaml", cwd=demo)
    run(*khe_vol, "check", "study.yaml", cwd=demo)
    run(sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "--configfile",
        "study.yaml", cwd=demo)

    def rows(path):
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t"))

    truth = {(r["participant_id"], r["session_id"]): float(r["true_volume_ml"]) for r in rows(demo / "truth.tsv")}
    response = rows(demo / "results" / "response.tsv")
    assert len(response) == 2
    for row in response:
        ratio = truth[(row["participant_id"], row["session_id"])] / truth[(row["participant_id"], "ses-baseline")]
        assert row["category"] == true_category(ratio), row
    volumes = {(r["participant_id"], r["session_id"]): float(r["volume_ml"])
               for r in rows(demo / "results" / "volumes.tsv")}
    for key, true_ml in truth.items():
        assert volumes[key] == pytest.approx(true_ml, rel=0.06), key
