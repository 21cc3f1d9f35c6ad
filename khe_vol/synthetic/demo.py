"""The demo study behind ``khe-vol demo``: six participants, three sessions each, with exact truth on disk.

Also :func:`nifti_gz_bytes`, the reproducible NIfTI encoding every phantom
writer (demo, tests, benchmarks) uses.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.nifti import atomic_write_bytes, nifti_bytes
from khe_vol.synthetic.anatomy import make_anatomy
from khe_vol.synthetic.points import unit_vector
from khe_vol.synthetic.render import lesion_fits_fov, render_series
from khe_vol.synthetic.seeds import phantom_reader_seeds
from khe_vol.synthetic.specs import SeriesSpec


#: Session labels and months of the demo study.
DEMO_SESSIONS = (("baseline", 0), ("m06", 6), ("m12", 12))


def true_category(volume_ratio):
    """Response category of an exact follow-up/baseline volume ratio.

    Uses :func:`khe_vol.response.classify_ratio`, so the demo truth follows
    the workflow's own thresholds.
    """
    from khe_vol.response import classify_ratio

    return classify_ratio(Fraction(repr(float(volume_ratio))))


#: The demo participants: target baseline volume (mL), volume ratios at m06
#: and m12, and each session's grid (orientation, oblique degrees, voxel mm).
DEMO_PLAN = (
    dict(volume_ml=60.0, ratios=(1.30, 1.45),  # growth
         grids=(("axial_ras", 0, (0.9, 0.9, 4.0)), ("axial_ras", 0, (0.9, 0.9, 4.0)),
                ("axial_lps", 0, (0.9, 0.9, 4.0)))),
    dict(volume_ml=85.0, ratios=(1.04, 0.95),  # no change
         grids=(("axial_lps", 0, (0.8, 0.8, 3.5)), ("axial_ras", 0, (0.9, 0.9, 4.0)),
                ("axial_lps", 12, (0.8, 0.8, 3.5)))),
    dict(volume_ml=105.0, ratios=(0.70, 0.55),  # partial involution
         grids=(("axial_lps", 15, (0.9, 0.9, 3.5)), ("axial_lps", 15, (0.9, 0.9, 3.5)),
                ("axial_lps", 8, (0.9, 0.9, 3.5)))),
    dict(volume_ml=75.0, ratios=(0.40, 0.12),  # nearly complete involution
         grids=(("sagittal", 0, (0.9, 0.9, 4.0)), ("sagittal", 6, (0.9, 0.9, 4.0)),
                ("axial_ras", 0, (0.9, 0.9, 4.0)))),
    dict(volume_ml=45.0, ratios=(0.35, 0.0),  # complete involution
         grids=(("axial_ras", 10, (0.8, 0.8, 3.0)), ("axial_lps", 0, (0.8, 0.8, 3.0)),
                ("axial_ras", 10, (0.8, 0.8, 3.0)))),
    dict(volume_ml=95.0, ratios=(0.90, 0.70),  # partial involution, grids change between sessions
         grids=(("axial_ras", 0, (1.0, 1.0, 3.0)), ("sagittal", 0, (1.0, 1.0, 4.0)),
                ("axial_lps", 0, (0.9, 0.9, 4.0)))),
)


def _child_seed(*keys):
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def demo_participant(participant_index, rng_seed=0, shape=(160, 160, 30), max_attempts=20):
    """Anatomy and the three sessions of one demo participant.

    The anatomy is re-drawn (deterministically) until the lesion fits every
    session's field of view.

    Returns
    -------
    anatomy : Anatomy
    sessions : list of (session_label, month, SeriesSpec)

    Raises
    ------
    RuntimeError
        If no draw fits (``shape`` too small for the planned lesion).
    """
    plan = DEMO_PLAN[participant_index % len(DEMO_PLAN)]
    rng = np.random.default_rng(_child_seed(rng_seed, participant_index, 1))
    ratios = (1.0,) + tuple(plan["ratios"])
    sessions = []
    for (label, month), ratio, (orient, oblique, voxel) in zip(DEMO_SESSIONS, ratios, plan["grids"]):
        # Repositioning: a few degrees and up to a few cm of table travel.
        rotation = tuple(float(v) for v in rng.uniform(-4, 4, size=3))
        translation = tuple(float(v) for v in rng.uniform([-12, -12, -40], [12, 12, 40]))
        sessions.append((label, month, SeriesSpec(
            shape=tuple(int(v) for v in shape), voxel_mm=tuple(voxel), orientation=orient, oblique_deg=float(oblique),
            oblique_axis=tuple(float(v) for v in unit_vector(np.array([1.0, rng.uniform(-0.5, 0.5), 0.0]))),
            snr=float(rng.uniform(15, 25)), bias_amplitude=float(rng.uniform(0.15, 0.3)),
            rotation_deg=rotation, translation_mm=translation,
            fov_offset_mm=tuple(float(v) for v in rng.uniform(-4, 4, size=3)),
            volume_ratio=float(ratio), rng_seed=_child_seed(rng_seed, participant_index, 2, month),
        )))
    for attempt in range(max_attempts):
        anatomy = make_anatomy(_child_seed(rng_seed, participant_index, 0, attempt), lesion_volume_ml=plan["volume_ml"])
        if all(lesion_fits_fov(anatomy, spec) for _, _, spec in sessions):
            return anatomy, sessions
    raise RuntimeError(f"demo participant {participant_index + 1}: the lesion does not fit a {tuple(shape)} field of view")


def nifti_gz_bytes(data, affine, dtype, descrip):
    """Gzipped NIfTI-1 bytes, the same for the same input on every call.

    Float data stored as an integer ``dtype`` gets nibabel's scl_slope /
    scl_inter; qform and sform are both the affine with code 1 (scanner).
    """
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.set_data_dtype(dtype)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode("ascii")[:79]
    return nifti_bytes(img)


#: Arms of the demo trial, experimental first.
DEMO_ARMS = ("sirolimus_prednisolone", "sirolimus")


def demo_allocation_tsv(n_participants, rng_seed=0):
    """Allocation table of the demo trial: permuted blocks of two, reproducible.

    Parameters
    ----------
    n_participants : int
        Participants ``sub-demo01`` ... allocated (may exceed those imaged).
    rng_seed : int

    Returns
    -------
    str
        TSV text with ``participant_id`` and ``arm``.
    """
    rng = np.random.default_rng([rng_seed, 2024])
    arms = []
    while len(arms) < n_participants:
        arms.extend(rng.permutation(DEMO_ARMS))
    rows = ["participant_id\tarm"] + [f"sub-demo{i + 1:02d}\t{arm}" for i, arm in enumerate(arms[:n_participants])]
    return "\n".join(rows) + "\n"


def write_demo_cohort(out_dir, n_participants=6, rng_seed=0, shape=(160, 160, 30)):
    """Write a complete demo study with exact truth.

    Layout under ``out_dir``::

        imaging/sub-demoNN/ses-{baseline,m06,m12}/anat/sub-demoNN_ses-*_T2w.nii.gz
        truth/sub-demoNN/ses-*/anat/sub-demoNN_ses-*_label-lesion_mask.nii.gz
        seeds.tsv   participant_id x y z  (baseline seed, scanner RAS+ mm: where a
                    reader clicks, bright lesion tissue >= 3 mm inside the boundary,
                    not the deepest point; :func:`reader_seeds_ras_mm`)
        truth.tsv   participant_id session_id month true_volume_ml
                    true_percent_change true_category
        allocation.tsv  participant_id arm  (randomised in blocks of two;
                    one more participant was allocated but never imaged,
                    as happens in a trial: intention to treat counts them)

    With the default six participants every response category appears at
    m12, well away from its thresholds. Series are int16 with scl_slope.
    Files are byte-identical across calls with the same arguments.

    Parameters
    ----------
    out_dir : path-like
    n_participants : int
        Beyond six, the plan repeats with new anatomy.
    rng_seed : int
    shape : tuple of 3 int
        Grid shape of every series.

    Returns
    -------
    dict
        ``imaging_dir``, ``seeds``, ``truth`` (paths), and ``series`` and
        ``truth_masks``, each ``{(participant_id, session_id): path}``.

    Raises
    ------
    RuntimeError
        If a lesion cannot be made to fit its field of view (too small a ``shape``).
    """
    out = Path(out_dir)
    series_paths, mask_paths = {}, {}
    seed_rows = ["participant_id\tx\ty\tz"]
    truth_rows = ["participant_id\tsession_id\tmonth\ttrue_volume_ml\ttrue_percent_change\ttrue_category"]
    for index in range(int(n_participants)):
        pid = f"sub-demo{index + 1:02d}"
        anatomy, sessions = demo_participant(index, rng_seed, shape)
        for label, month, spec in sessions:
            sid = f"ses-{label}"
            ph = render_series(anatomy, spec)
            stem = f"{pid}_{sid}"
            descrip = f"khe_vol phantom fs-T2w {pid} {sid} ratio={spec.volume_ratio:g} snr={spec.snr:.0f}"
            path = out / "imaging" / pid / sid / "anat" / f"{stem}_T2w.nii.gz"
            atomic_write_bytes(path, nifti_gz_bytes(ph.image, ph.affine, np.int16, descrip))
            series_paths[(pid, sid)] = path
            mpath = out / "truth" / pid / sid / "anat" / f"{stem}_label-lesion_mask.nii.gz"
            atomic_write_bytes(mpath, nifti_gz_bytes(ph.truth_mask, ph.affine, np.uint8, f"khe_vol truth {pid} {sid}"))
            mask_paths[(pid, sid)] = mpath
            if month == 0:
                seed = phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng(_child_seed(rng_seed, index, 3)))[0]
                seed_rows.append(f"{pid}\t" + "\t".join(f"{v:.2f}" for v in seed))
                change, category = "n/a", "n/a"
            else:
                change = f"{(spec.volume_ratio - 1) * 100:.2f}"
                category = true_category(spec.volume_ratio)
            truth_rows.append(f"{pid}\t{sid}\t{month}\t{ph.true_volume_ml:.4f}\t{change}\t{category}")
    seeds, truth, allocation = out / "seeds.tsv", out / "truth.tsv", out / "allocation.tsv"
    atomic_write_bytes(seeds, ("\n".join(seed_rows) + "\n").encode())
    atomic_write_bytes(truth, ("\n".join(truth_rows) + "\n").encode())
    atomic_write_bytes(allocation, demo_allocation_tsv(int(n_participants) + 1, rng_seed).encode())
    return {"imaging_dir": out / "imaging", "seeds": seeds, "truth": truth, "allocation": allocation,
            "series": series_paths, "truth_masks": mask_paths}
