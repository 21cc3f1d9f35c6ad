"""Screenshot of the reader app in longitudinal reading, for the README: ``docs/longitudinal_view.png``.

A synthetic participant scanned twice on different grids (T1: axial RAS,
0.9 x 0.9 x 4 mm; T2: axial as DICOM stores it, repositioned, 0.8 x 0.8 x 5 mm,
the lesion at 55 %), packaged for longitudinal reading, served, and the T2
case opened in Debian's Chromium with the crosshair in the lesion.

Run from the repository root (needs ``npm ci`` and /usr/bin/chromium)::

    PYTHONPATH=. python docs/screenshot_longitudinal.py
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "longitudinal_view.png"


def write_participant(root):
    """Two sessions of one synthetic participant, as workflow records with proposed masks."""
    from khe_vol.files import sha256_file
    from khe_vol.nifti import mask_image, write_nifti
    from khe_vol.synthetic.anatomy import make_anatomy
    from khe_vol.synthetic.render import render_series
    from khe_vol.synthetic.specs import SeriesSpec

    anatomy = make_anatomy(11, lesion_volume_ml=60.0)
    specs = {
        ("ses-baseline", 0): SeriesSpec(shape=(128, 128, 24), voxel_mm=(0.9, 0.9, 4.0), rng_seed=1),
        ("ses-m06", 6): SeriesSpec(shape=(144, 144, 20), voxel_mm=(0.8, 0.8, 5.0), orientation="axial_lps",
                                   rotation_deg=(0.0, 0.0, 6.0), translation_mm=(4.0, -3.0, 2.0),
                                   volume_ratio=0.55, rng_seed=2),
    }
    records = []
    for (ses, month), spec in specs.items():
        phantom = render_series(anatomy, spec)
        src = root / "imaging" / "sub-01" / ses / "anat" / f"sub-01_{ses}_T2w.nii.gz"
        src.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(phantom.image.astype(np.float32), None)
        img.set_sform(phantom.affine, code=1)
        img.set_qform(phantom.affine, code=1)
        src.write_bytes(gzip.compress(img.to_bytes(), mtime=0))
        rec_dir = root / "results" / "work" / "series" / "sub-01" / ses
        write_nifti(rec_dir / "mask.nii.gz", mask_image(phantom.truth_mask != 0, phantom.affine))
        record = {
            "participant_id": "sub-01", "session_id": ses, "month": month, "status": "ok", "message": None,
            "method": "auto", "volume_ml": phantom.true_volume_ml, "source_file": str(src),
            "source_sha256": sha256_file(src), "shape": list(phantom.image.shape), "affine": phantom.affine.tolist(),
        }
        (rec_dir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(rec_dir / "record.json")
    return records, specs, anatomy


def main():
    sys.path.insert(0, str(REPO))
    from khe_vol.cli import main as khe_vol
    from khe_vol.qa.key import read_key
    from tests.test_qa_app import reader_browser

    with tempfile.TemporaryDirectory(prefix="khe-vol-shot-") as tmp:
        tmp = Path(tmp)
        records, _, _ = write_participant(tmp)
        results = tmp / "results"
        assert khe_vol(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "715517",
                        "--reading-mode", "longitudinal", *map(str, records)]) == 0
        code = next(r["case_code"] for r in read_key(results) if r["timepoint"] == "2")
        with reader_browser(results, tmp, auto_advance=True) as served:  # the reader's default
            page = served.page
            page.set_viewport_size({"width": 1400, "height": 860})
            page.goto(f"{served.base}/case/{code}")
            page.wait_for_selector("body[data-compare-ready='1']", timeout=60000)
            page.click("button[data-slice='0']")  # axial
            # The crosshair in the lesion: at the proposed mask's centre of mass (RAS mm) of T2.
            mask = nib.load(results / "qa" / "R1" / f"{code}_mask.nii.gz")
            ijk = np.argwhere(np.asarray(mask.dataobj) != 0).mean(axis=0)
            mm = (mask.affine @ np.r_[ijk, 1.0])[:3].tolist()
            page.evaluate("""(mm) => { const nv = window.khe.nv;
                nv.scene.crosshairPos = nv.mm2frac(mm, 0, true); nv.drawScene(); }""", mm)
            page.wait_for_timeout(800)
            page.screenshot(path=str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
