"""The BIDS derivatives dataset of lesion masks, with provenance sidecars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from khe_vol import __version__
from khe_vol.files import atomic_write_text, replacing_dir
from khe_vol.report.provenance import software_versions

DATASET_DESCRIPTION = {
    "Name": "khe-vol lesion masks",
    "BIDSVersion": "1.9.0",
    "DatasetType": "derivative",
    "GeneratedBy": [
        {
            "Name": "khe-vol",
            "Version": __version__,
            "Description": "Seeded lesion segmentation and volumetric response for KHE trials",
        }
    ],
}


def mask_relpath(participant_id, session_id, reader=None):
    """Path of a lesion mask inside the derivatives dataset (``desc-<reader>`` for a reader's edit)."""
    desc = f"_desc-{reader}" if reader else ""
    return Path(participant_id, session_id, "anat", f"{participant_id}_{session_id}{desc}_label-lesion_mask.nii.gz")


def mask_sidecar(record):
    """JSON sidecar of a derivative mask: how it was made and from what."""
    return {
        "Description": "Lesion mask (1 = lesion) on exactly the grid of the source T2w series.",
        "Method": record["method"],
        "SourceFile": record["source_file"],
        "SourceSHA256": record["source_sha256"],
        "AffineSource": record["affine_source"],
        "SeedRASmm": record["seed_ras_mm"],
        "ReferenceSession": record["reference_session_id"],
        "ReaderMaskFile": record["reader_mask_file"],
        "ReaderMaskSHA256": record["reader_mask_sha256"],
        "Parameters": record["parameters"],
        "Details": record["details"],
        "VolumeML": record["volume_ml"],
        "NVoxels": record["n_voxels"],
        "VoxelVolumeMM3": record["voxel_volume_mm3"],
        "GeneratedBy": DATASET_DESCRIPTION["GeneratedBy"],
        "Software": software_versions(),
    }


def edited_sidecar(record, reader):
    """JSON sidecar of a reader's edited mask."""
    return {
        "Description": f"Lesion mask as corrected by blinded reader {reader} (1 = lesion), on exactly "
        "the grid of the source T2w series.",
        "Method": "reader_edit",
        "Reader": reader,
        "SourceFile": record["source_file"],
        "SourceSHA256": record["source_sha256"],
        "GeneratedBy": DATASET_DESCRIPTION["GeneratedBy"],
        "Software": software_versions(),
    }


def write_derivatives(records_and_masks, out_dir, edited=()):
    """Write the derivatives dataset.

    Parameters
    ----------
    records_and_masks : iterable of (dict, path-like)
        Each series' record and the path of its mask NIfTI (already written
        reproducibly on the series grid); series with errors are skipped.
    edited : iterable of (dict, str, path-like)
        Series record, reader id and path of that reader's edited mask.
    out_dir : path-like
        Dataset root; built in a sibling temporary folder and moved into
        place, so a crash never leaves a half-written dataset.
    """
    with replacing_dir(out_dir) as tmp:
        atomic_write_text(tmp / "dataset_description.json", json.dumps(DATASET_DESCRIPTION, indent=2) + "\n")
        for record, mask_path in records_and_masks:
            if record["status"] != "ok":
                continue
            rel = mask_relpath(record["participant_id"], record["session_id"])
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mask_path, tmp / rel)
            sidecar = tmp / str(rel).replace(".nii.gz", ".json")
            atomic_write_text(sidecar, json.dumps(mask_sidecar(record), indent=2, sort_keys=False) + "\n")
        for record, reader, mask_path in edited:
            rel = mask_relpath(record["participant_id"], record["session_id"], reader)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mask_path, tmp / rel)
            atomic_write_text(tmp / str(rel).replace(".nii.gz", ".json"),
                              json.dumps(edited_sidecar(record, reader), indent=2) + "\n")
