"""Thick slices never pass silently: flagged in the tables, with a band that holds the truth.

A demo participant (85 mL, no change at month 12) rendered on 0.8-0.9 x 10 mm
grids goes through the workflow's own commands (``khe-vol series`` for the
seeded baseline and the tracked follow-up, then ``khe-vol tables``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from khe_vol.synthetic.demo import demo_participant, nifti_gz_bytes
from khe_vol.synthetic.render import render_labels, render_series
from khe_vol.synthetic.specs import LESION, LESION_LABELS
from khe_vol.files import atomic_write_bytes, read_tsv
from khe_vol.geometry import voxel_sizes_mm, voxel_to_world

SLICE_MM = 10.0


def khe_vol(*args):
    proc = subprocess.run([sys.executable, "-m", "khe_vol.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def thick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("thick")
    anatomy, sessions = demo_participant(1)
    series = {}
    for label, month, spec in sessions:
        if label == "m06":
            continue
        spec = replace(spec, voxel_mm=(spec.voxel_mm[0], spec.voxel_mm[1], SLICE_MM),
                       shape=(spec.shape[0], spec.shape[1], math.ceil(30 * 4.0 / SLICE_MM) + 2))
        rendered = render_series(anatomy, spec)
        path = tmp / f"sub-01_ses-{label}_T2w.nii.gz"
        atomic_write_bytes(path, nifti_gz_bytes(rendered.image, rendered.affine, np.int16, "thick"))
        series[label] = (month, path, rendered, spec)
    # A reader's click: a bright lesion voxel at least 3 mm inside, not the deepest point.
    _, _, base, spec = series["baseline"]
    labels = render_labels(anatomy, spec)
    depth = ndimage.distance_transform_edt(np.isin(labels, LESION_LABELS), sampling=voxel_sizes_mm(base.affine))
    candidates = np.argwhere((labels == LESION) & (depth >= 3))
    seed = voxel_to_world(candidates[np.random.default_rng(4).integers(len(candidates))], base.affine)

    out = {}
    for label, (month, path, _, _) in series.items():
        work = tmp / "work" / label
        work.mkdir(parents=True)
        args = ["series", "--participant", "sub-01", "--session", f"ses-{label}", "--month", month, "--image", path,
                "--record", work / "record.json", "--mask", work / "mask.nii.gz"]
        if label == "baseline":
            args += ["--seed", *seed]
        else:
            ref = tmp / "work" / "baseline"
            args += ["--reference-record", ref / "record.json", "--reference-mask", ref / "mask.nii.gz"]
        khe_vol(*args)
        out[label] = json.loads((work / "record.json").read_text())
    results = tmp / "results"
    khe_vol("tables", "--results-dir", results, "--baseline-session", "ses-baseline",
            *(tmp / "work" / label / "record.json" for label in series))
    return series, out, read_tsv(results / "volumes.tsv"), read_tsv(results / "response.tsv")


def test_thick_slices_flagged_in_volumes_and_response_tables(thick_run):
    _, records, volumes, response = thick_run
    assert [r["status"] for r in records.values()] == ["ok", "ok"], [r["message"] for r in records.values()]
    for row in volumes:
        assert row["needs_review"] == "1"
        assert "thick_slices" in row["review_reason"].split(";")
    (row,) = response
    assert row["status"] == "ok" and row["needs_review"] == "1"
    assert {"thick_slices", "baseline_needs_review"} <= set(row["review_reason"].split(";"))


def test_band_holds_the_true_volume_on_10_mm_slices(thick_run):
    series, records, _, response = thick_run
    for label, record in records.items():
        truth = series[label][2].true_volume_ml
        assert record["volume_low_ml"] <= truth <= record["volume_high_ml"], (label, truth, record["volume_low_ml"],
                                                                              record["volume_high_ml"])
    # The true change (-5 %, no change) lies within the response band.
    (row,) = response
    assert float(row["percent_change_low"]) <= -5.0 <= float(row["percent_change_high"])
