"""Stability benchmark: does a volume survive storage differences far below a voxel?

Issue 22. Every series is measured in up to five *versions* that hold the same voxels
at the same physical positions, give or take what a header's precision or a converter
changes:

- ``orig``: int16 stored values + ``scl_slope`` (:func:`khe_vol.synthetic.dicom.stored_values`,
  written by :func:`khe_vol.synthetic.dicom.direct_nifti`), as a site writes it;
- ``a``: the slice step x (1 + 2.5e-5) and the origin moved 0.003 mm (along (1, 1, 1) / sqrt 3);
- ``b``: the in-plane spacing x (1 - 1e-5) and the origin moved 0.01 mm along the slice axis;
- ``c``: array axis 0 reversed, the affine changed to match (every voxel keeps its position);
- ``d``: a DICOM round trip: :mod:`khe_vol.synthetic.dicom` writes the stored values as a
  scanner's DICOM (single-frame; the DICOM demo's participant 02 as enhanced multi-frame)
  and the real ``khe-vol import`` converts it (dcm2niix, checked against the DICOM voxels).

Versions ``a``, ``b``, ``c`` change the affine only (and ``c`` the array order); the slice
axis is the array's third axis, as in every phantom and in the DICOM this project writes.

Series:

- a *variation cohort* of phantom participants ``sub-stNN`` (baseline, m06, m12; the m12
  volume a growth, no change, partial or nearly complete involution; each session on another
  grid: 0.55 x 0.55 x 4 mm 320 x 320 x 40, 0.9 x 0.9 x 4 mm 200 x 200 x 36 or 1 x 1 x 3 mm
  96 x 96 x 20, axial LPS / axial RAS / sagittal, oblique up to 15 degrees, repositioned);
- the DICOM demo's participants ``sub-01`` and ``sub-02``
  (:data:`khe_vol.synthetic.dicom.DICOM_DEMO_PARTICIPANTS`, rendered as
  :func:`khe_vol.synthetic.dicom.write_dicom_demo` renders them: the README's known-unstable
  tracked follow-up, sub-01 m06);
- the six real BraTS 2013 FLAIR scans in ``../shared/realdata/brats2013`` when present
  (baseline only; quantised to int16 once, like the phantoms, so every version holds the
  same values).

Within a version the workflow's chain runs as in a study: the baseline is segmented from a
reader-placed seed (:mod:`khe_vol.synthetic.seeds`; the same RAS+ mm point in every version)
and each follow-up is tracked from *that version's* baseline record and mask
(:func:`khe_vol.series.measure_series`). Per series it reports the volume of every version,
the spread ``(max - min) / median`` over the versions, and for follow-ups the response
category of each version (:func:`khe_vol.response.classify_change`, exact from voxel counts)
and whether it changes. A version that fails counts as a change (no category) and leaves
the series without a spread.

Targets (issue 22): every spread <= 1 %; no category changes; median spread <= 0.2 %.

Usage, from the repository root (5-8 minutes on 2 cores; about 560 CPU seconds)::

    python benchmarks/stability.py                             # writes results/benchmark_stability.json
    python benchmarks/stability.py --participants 1 --skip-real  # a quick look
    python benchmarks/stability.py --skip-dicom --keep /tmp/stab  # no DICOM; keep every file written
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segmentation import REALDATA  # noqa: E402  (the same real scans)

from khe_vol.response import classify_change  # noqa: E402
from khe_vol.review import series_reasons  # noqa: E402
from khe_vol.series import measure_series  # noqa: E402
from khe_vol.synthetic.anatomy import make_anatomy  # noqa: E402
from khe_vol.synthetic.dicom import (  # noqa: E402
    DICOM_DEMO_PARTICIPANTS,
    DICOM_DEMO_VISITS,
    SeriesInfo,
    StudyInfo,
    direct_nifti,
    small_phantom,
    stored_values,
    write_enhanced_series,
    write_single_frame_series,
)
from khe_vol.synthetic.render import lesion_fits_fov, render_series  # noqa: E402
from khe_vol.synthetic.seeds import phantom_reader_seeds, reader_seeds_ras_mm  # noqa: E402
from khe_vol.synthetic.specs import SeriesSpec  # noqa: E402

#: Version name -> what it changes (the JSON carries this).
VERSIONS = {
    "orig": "int16 stored values + scl_slope, the phantom's (or scan's) own affine",
    "a": "slice step x (1 + 2.5e-5), origin moved 0.003 mm along (1, 1, 1) / sqrt(3)",
    "b": "in-plane spacing x (1 - 1e-5), origin moved 0.01 mm along the slice axis",
    "c": "array axis 0 reversed, affine changed so every voxel keeps its position",
    "d": "DICOM (khe_vol.synthetic.dicom) then `khe-vol import` (dcm2niix)",
}
SLICE_AXIS = 2
SLICE_STEP_FACTOR = 1 + 2.5e-5
ORIGIN_SHIFT_A_MM = 0.003 * np.ones(3) / math.sqrt(3)
IN_PLANE_FACTOR = 1 - 1e-5
ORIGIN_SHIFT_B_MM = 0.01
FLIPPED_AXIS = 0

SESSION_MONTHS = {"baseline": 0, "m06": 6, "m12": 12}
#: Month-12 volume ratio of variation participant ``i``: ``M12_RATIOS[i % 4]`` (growth, no
#: change, partial, nearly complete involution); m06 lies 40-70 % of the way there.
M12_RATIOS = (1.45, 0.95, 0.55, 0.15)
#: (voxel_mm, shape) of the variation cohort's grids; session n of participant i takes
#: ``GRIDS[(i + n) % 3]`` and ``ORIENTATIONS[(i + 2 n) % 3]``.
GRIDS = (((0.55, 0.55, 4.0), (320, 320, 40)), ((0.9, 0.9, 4.0), (200, 200, 36)), ((1.0, 1.0, 3.0), (96, 96, 20)))
ORIENTATIONS = ("axial_lps", "axial_ras", "sagittal")
RNG_SEED = 2028
DICOM_DEMO_RNG_SEED = 0  # write_dicom_demo's default: the README's worked example
T2_SERIES = SeriesInfo()

TARGET_MAX_SPREAD_PCT = 1.0
TARGET_MEDIAN_SPREAD_PCT = 0.2

#: Short category names for the printed table.
SHORT = {"growth": "grow", "no_change": "same", "partial_involution": "part",
         "nearly_complete_involution": "near", "complete_involution": "gone", None: "-"}


# ---------------------------------------------------------------- the versions (pure)


def slice_step_changed(affine):
    """Version ``a``'s affine: the slice step x :data:`SLICE_STEP_FACTOR`, origin moved 0.003 mm.

    Parameters
    ----------
    affine : (4, 4) array_like
        Voxel -> RAS+ mm.

    Returns
    -------
    (4, 4) float64 ndarray
    """
    out = np.array(affine, dtype=float)
    out[:3, SLICE_AXIS] *= SLICE_STEP_FACTOR
    out[:3, 3] += ORIGIN_SHIFT_A_MM
    return out


def in_plane_changed(affine):
    """Version ``b``'s affine: in-plane steps x :data:`IN_PLANE_FACTOR`, origin 0.01 mm along the slices."""
    out = np.array(affine, dtype=float)
    slice_dir = out[:3, SLICE_AXIS] / np.linalg.norm(out[:3, SLICE_AXIS])
    for axis in {0, 1, 2} - {SLICE_AXIS}:
        out[:3, axis] *= IN_PLANE_FACTOR
    out[:3, 3] += ORIGIN_SHIFT_B_MM * slice_dir
    return out


def axis_reversed(data, affine, axis=FLIPPED_AXIS):
    """Version ``c``: one array axis reversed, the affine changed so each voxel stays where it was.

    Parameters
    ----------
    data : (I, J, K) ndarray
    affine : (4, 4) array_like
    axis : int

    Returns
    -------
    data : ndarray
        ``data`` with ``axis`` reversed (contiguous).
    affine : (4, 4) float64 ndarray
        ``affine @ F``, where ``F`` maps the new index ``n - 1 - i`` to the old ``i``.
    """
    flip = np.eye(4)
    flip[axis, axis] = -1.0
    flip[axis, 3] = data.shape[axis] - 1
    return np.ascontiguousarray(np.flip(data, axis)), np.asarray(affine, float) @ flip


def nifti_versions(stored, affine):
    """``{version: (stored values, affine)}`` of the versions written directly as NIfTI."""
    return {"orig": (stored, np.asarray(affine, float)),
            "a": (stored, slice_step_changed(affine)),
            "b": (stored, in_plane_changed(affine)),
            "c": axis_reversed(stored, affine)}


# ---------------------------------------------------------------- the series


@dataclass
class StoredSeries:
    """One session of a subject, as int16 stored values on its grid."""

    session: str
    stored: np.ndarray
    slope: float
    intercept: float
    affine: np.ndarray
    true_volume_ml: float | None
    grid: str

    @property
    def month(self):
        return SESSION_MONTHS[self.session]


@dataclass
class Subject:
    """A participant (or real scan): its sessions in order, the baseline seed, how its DICOM is stored."""

    label: str
    cohort: str
    series: list
    seed_ras_mm: tuple
    dicom_storage: str = "single-frame"

    @property
    def participant_id(self):
        return f"sub-{self.label}"


def grid_text(shape, voxel_mm, what):
    """``320x320x40 @ 0.55x0.55x4 mm <what>``: a grid for the table."""
    return f"{'x'.join(str(n) for n in shape)} @ {'x'.join(f'{v:g}' for v in voxel_mm)} mm {what}"


def spec_grid_text(spec):
    return grid_text(spec.shape, spec.voxel_mm, f"{spec.orientation} oblique {spec.oblique_deg:.0f} deg")


def stored_series(session, phantom, grid):
    stored, slope, intercept = stored_values(phantom.image)
    return StoredSeries(session, stored, slope, intercept, np.asarray(phantom.affine, float),
                        float(phantom.true_volume_ml), grid)


def seed_as_tabled(seed_ras_mm):
    """A seed rounded to 0.01 mm, as a seeds table holds it."""
    return tuple(round(float(v), 2) for v in seed_ras_mm)


def variation_specs(index, rng):
    """Anatomy and ``{session: SeriesSpec}`` of variation participant ``index`` (lesion inside every grid)."""
    m12 = M12_RATIOS[index % len(M12_RATIOS)]
    ratios = {"baseline": 1.0, "m06": 1.0 + (m12 - 1.0) * float(rng.uniform(0.4, 0.7)), "m12": m12}
    for _attempt in range(30):
        anatomy = make_anatomy(int(rng.integers(1 << 31)), lesion_volume_ml=float(rng.uniform(10, 25)))
        specs = {}
        for n, (session, ratio) in enumerate(ratios.items()):
            voxel_mm, shape = GRIDS[(index + n) % len(GRIDS)]
            specs[session] = SeriesSpec(
                shape=shape, voxel_mm=voxel_mm, orientation=ORIENTATIONS[(index + 2 * n) % len(ORIENTATIONS)],
                oblique_deg=float(rng.uniform(0, 15)), oblique_axis=tuple(rng.standard_normal(3)),
                snr=float(rng.uniform(12, 25)), bias_amplitude=float(rng.uniform(0.2, 0.4)),
                rotation_deg=tuple(rng.uniform(-5, 5, 3)) if n else (0.0, 0.0, 0.0),
                translation_mm=tuple(rng.uniform(-10, 10, 3)) if n else (0.0, 0.0, 0.0),
                fov_offset_mm=tuple(rng.uniform(-6, 6, 3)), volume_ratio=float(ratio),
                rng_seed=int(rng.integers(1 << 31)))
        if all(lesion_fits_fov(anatomy, spec) for spec in specs.values()):
            return anatomy, specs
    raise RuntimeError(f"variation participant {index}: the lesion does not fit the fields of view")


def variation_subject(index):
    """Variation participant ``sub-stNN``: three sessions, seeded where a reader clicks."""
    anatomy, specs = variation_specs(index, np.random.default_rng([RNG_SEED, index]))
    series, seed = [], None
    for session, spec in specs.items():
        phantom = render_series(anatomy, spec)
        if session == "baseline":
            rng = np.random.default_rng([RNG_SEED, index, 3])
            seed = phantom_reader_seeds(anatomy, spec, phantom, rng)[0]
        series.append(stored_series(session, phantom, spec_grid_text(spec)))
    return Subject(f"st{index + 1:02d}", "variation", series, seed_as_tabled(seed))


def dicom_demo_subject(index):
    """The DICOM demo's participant ``index`` (0 or 1), rendered and seeded as ``write_dicom_demo`` does."""
    pid, storage, orientation, oblique_deg = DICOM_DEMO_PARTICIPANTS[index]
    series, seed = [], None
    shape, voxel_mm = (96, 96, 20), (1.0, 1.0, 3.0)
    grid = grid_text(shape, voxel_mm, f"{orientation} oblique {oblique_deg:.0f} deg")
    for session, volume_ml, _date in DICOM_DEMO_VISITS:
        phantom = small_phantom(rng_seed=DICOM_DEMO_RNG_SEED + int(pid), orientation=orientation,
                                oblique_deg=oblique_deg, shape=shape, voxel_mm=voxel_mm, lesion_volume_ml=volume_ml)
        if session == "baseline":
            rng = np.random.default_rng(DICOM_DEMO_RNG_SEED + 5)
            seed = reader_seeds_ras_mm(phantom.truth_mask, phantom.affine, rng)[0]
        series.append(stored_series(session, phantom, grid))
    return Subject(pid, "dicom_demo", series, seed_as_tabled(seed), dicom_storage=storage)


def real_labels(realdata):
    """Labels (``bratsNN``) of the real scans, sorted; empty when the folder is absent."""
    realdata = Path(realdata)
    if not realdata.is_dir():
        return []
    return sorted(p.name.removeprefix("sub-") for p in realdata.glob("sub-*") if p.is_dir())


def real_subject(index, realdata):
    """Real scan ``index`` (sorted): FLAIR quantised to int16 once; seeded as ``benchmarks/segmentation.py`` does.

    The seed is a reader-like one (FLAIR-bright tumour or oedema, expert labels 2-4,
    >= 3 mm inside), not the folder's seeds.tsv (the deepest point).
    """
    realdata = Path(realdata)
    label = real_labels(realdata)[index]
    pid = f"sub-{label}"
    image = nib.load(next((realdata / pid).rglob("*_FLAIR.nii.gz")))
    dseg = nib.load(next((realdata / "truth" / pid).glob("*_dseg.nii.gz")))
    bright = np.isin(np.asarray(dseg.dataobj), (2, 3, 4))
    seed = reader_seeds_ras_mm(bright, dseg.affine, np.random.default_rng([2026, index, 3]))[0]
    stored, slope, intercept = stored_values(np.asarray(image.dataobj, dtype=np.float32))
    grid = grid_text(image.shape, image.header.get_zooms()[:3], "real FLAIR")
    return Subject(label, "brats", [StoredSeries("baseline", stored, slope, intercept, image.affine, None, grid)],
                   seed_as_tabled(seed))


def build_subject(kind, index, realdata):
    if kind == "variation":
        return variation_subject(index)
    if kind == "dicom_demo":
        return dicom_demo_subject(index)
    return real_subject(index, realdata)


# ---------------------------------------------------------------- writing the versions


def write_nifti_versions(folder, subject):
    """``{version: {session: path}}`` of the versions written directly (orig, a, b, c)."""
    paths = {}
    for s in subject.series:
        for version, (stored, affine) in nifti_versions(s.stored, s.affine).items():
            path = Path(folder) / version / f"{subject.participant_id}_ses-{s.session}_T2w.nii.gz"
            paths.setdefault(version, {})[s.session] = direct_nifti(path, stored, s.slope, s.intercept, affine)
    return paths


def write_site_export(folder, subject):
    """Each session of ``subject`` as a scanner's DICOM study; returns the visits.tsv rows."""
    writer = write_enhanced_series if subject.dicom_storage == "enhanced" else write_single_frame_series
    rows = ["participant_id\tsession_id\tstudy_instance_uid"]
    for s in subject.series:
        study = StudyInfo(f"stability-{subject.label}-{s.session}")
        writer(Path(folder) / s.session, s.stored, s.affine, s.slope, s.intercept, study, T2_SERIES)
        rows.append(f"{subject.label}\t{s.session}\t{study.study_instance_uid}")
    return rows


def khe_vol_import(folder, subject):
    """Version ``d``: write the DICOM, run ``khe-vol import``; ``({session: path}, problem or None)``."""
    folder = Path(folder)
    visits = write_site_export(folder / "site_export", subject)
    (folder / "visits.tsv").write_text("\n".join(visits) + "\n")
    imaging = folder / "study" / "imaging"
    config = {"imaging_dir": str(imaging), "sessions": {s.session: s.month for s in subject.series}}
    (folder / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "khe_vol.cli", "import", str(folder / "site_export"), "--out", str(imaging),
           "--visits", str(folder / "visits.tsv"), "--config", str(folder / "study.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (folder / "import.log").write_text(proc.stdout + proc.stderr)
    paths = {s.session: imaging / subject.participant_id / f"ses-{s.session}" / "anat"
             / f"{subject.participant_id}_ses-{s.session}_T2w.nii.gz" for s in subject.series}
    if proc.returncode:
        return {}, f"khe-vol import exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}"
    return paths, None


# ---------------------------------------------------------------- measuring


def cpu_seconds():
    """CPU seconds of this process and its waited-for children so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_chain(subject, paths):
    """Measure one version's sessions as the workflow does: seed the baseline, track the rest from it.

    Parameters
    ----------
    subject : Subject
    paths : dict of str -> path-like
        Session -> this version's NIfTI.

    Returns
    -------
    dict of str -> dict
        Session -> ``record`` and ``cpu_seconds``.
    """
    out, reference = {}, None
    for s in subject.series:
        t0 = time.process_time()
        if reference is None:
            record, mask, _ = measure_series(subject.participant_id, f"ses-{s.session}", s.month, paths[s.session],
                                             seed_ras_mm=subject.seed_ras_mm)
            reference = {"record": record, "mask": mask}
        else:
            record, _, _ = measure_series(subject.participant_id, f"ses-{s.session}", s.month, paths[s.session],
                                          reference=reference)
        out[s.session] = {"record": record, "cpu_seconds": time.process_time() - t0}
    return out


def category_of(baseline, record):
    """Response category of a follow-up record against its baseline record, or None when there is none."""
    if baseline["status"] != "ok" or record["status"] != "ok" or not baseline["n_voxels"]:
        return None
    category, _ = classify_change(baseline["n_voxels"], baseline["voxel_volume_mm3"],
                                  record["n_voxels"], record["voxel_volume_mm3"])
    return category


def spread_pct(volumes_ml):
    """``(max - min) / median`` in %, or None when a version failed or the median is 0 with a spread."""
    if not volumes_ml or any(v is None for v in volumes_ml):
        return None
    low, high, median = min(volumes_ml), max(volumes_ml), float(np.median(volumes_ml))
    if high == low:
        return 0.0
    return 100 * (high - low) / median if median > 0 else None


def series_rows(subject, measured):
    """One row per session: volumes, categories and review reasons per version, spread, change."""
    rows = []
    baseline_session = subject.series[0].session
    for s in subject.series:
        by_version = {v: m[s.session] for v, m in measured.items()}
        records = {v: m["record"] for v, m in by_version.items()}
        volumes = {v: (r["volume_ml"] if r["status"] == "ok" else None) for v, r in records.items()}
        row = {
            "participant_id": subject.participant_id, "cohort": subject.cohort, "session_id": f"ses-{s.session}",
            "grid": s.grid, "true_volume_ml": None if s.true_volume_ml is None else round(s.true_volume_ml, 4),
            "volumes_ml": {v: None if x is None else round(x, 4) for v, x in volumes.items()},
            "spread_pct": spread_pct(list(volumes.values())),
            "review": {v: [item["reason"] for item in series_reasons(r)] for v, r in records.items()},
            "errors": {v: r["message"] for v, r in records.items() if r["status"] != "ok"},
            "cpu_seconds": {v: round(m["cpu_seconds"], 2) for v, m in by_version.items()},
            "categories": None, "category_changed": False,
        }
        if s.session != baseline_session:
            categories = {v: category_of(measured[v][baseline_session]["record"], r) for v, r in records.items()}
            row["categories"] = categories
            row["category_changed"] = len(set(categories.values())) > 1
        rows.append(row)
    return rows


def run_subject(job):
    """Worker: build one subject, write and import its versions, measure each version's chain.

    Parameters
    ----------
    job : tuple
        ``(kind, index, work_dir, with_dicom, realdata)``; kind is ``variation``,
        ``dicom_demo`` or ``brats``.

    Returns
    -------
    dict
        ``rows`` (see :func:`series_rows`), ``problems`` (import failures), ``cpu_seconds``
        (this job, the import's processes included) and ``wall_seconds``.
    """
    kind, index, work_dir, with_dicom, realdata = job
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    subject = build_subject(kind, index, realdata)
    folder = Path(work_dir) / subject.participant_id
    paths = write_nifti_versions(folder, subject)
    problems = []
    if with_dicom:
        imported, problem = khe_vol_import(folder / "dicom", subject)
        if problem:
            problems.append(f"{subject.participant_id}: version d skipped: {problem}")
        else:
            paths["d"] = imported
    measured = {version: measure_chain(subject, p) for version, p in paths.items()}
    return {"rows": series_rows(subject, measured), "problems": problems,
            "cpu_seconds": cpu_seconds() - cpu0, "wall_seconds": time.perf_counter() - wall0,
            "participant_id": subject.participant_id, "seed_ras_mm": list(subject.seed_ras_mm)}


# ---------------------------------------------------------------- summary and printing


def summarise(rows):
    """Median and max spread, series over 1 %, category changes and the three targets."""
    spreads = [math.inf if r["spread_pct"] is None else r["spread_pct"] for r in rows]
    over = [r for r, s in zip(rows, spreads) if s > TARGET_MAX_SPREAD_PCT]
    changed = [r for r in rows if r["category_changed"]]
    median = float(np.median(spreads)) if spreads else None
    finite = [s for s in spreads if math.isfinite(s)]
    out = {
        "series": len(rows),
        "follow_ups": sum(r["categories"] is not None for r in rows),
        "median_spread_pct": None if median is None or not math.isfinite(median) else round(median, 4),
        "max_spread_pct": round(max(finite), 4) if finite else None,
        "series_without_spread": sum(r["spread_pct"] is None for r in rows),
        "series_over_1_pct": len(over),
        "category_changes": len(changed),
        "over_1_pct": [f"{r['participant_id']} {r['session_id']}" for r in over],
        "changed": [f"{r['participant_id']} {r['session_id']}" for r in changed],
    }
    out["targets_met"] = {
        "every_spread_at_most_1_pct": bool(rows) and not over,
        "no_category_changes": not changed,
        "median_spread_at_most_0.2_pct": median is not None and median <= TARGET_MEDIAN_SPREAD_PCT,
    }
    return out


def format_row(row, versions):
    def volume(v):
        x = row["volumes_ml"].get(v)
        text = "error" if v in row["errors"] else ("-" if x is None else f"{x:.2f}")
        flagged = any(code != "thick_slices" for code in row["review"].get(v, []))
        return f"{text}{'*' if flagged else ' '}"

    spread = "n/a" if row["spread_pct"] is None else f"{row['spread_pct']:.3f}"
    categories = "" if row["categories"] is None else "/".join(SHORT[row["categories"].get(v)] for v in versions
                                                                if v in row["categories"])
    true = "" if row["true_volume_ml"] is None else f"{row['true_volume_ml']:.2f}"
    return (f"{row['participant_id']:<12} {row['session_id']:<13} {true:>6} "
            + " ".join(f"{volume(v):>8}" for v in versions)
            + f" {spread:>7} {categories:<24} {'YES' if row['category_changed'] else ''}")


def print_table(rows, versions):
    print(f"{'participant':<12} {'session':<13} {'true':>6} " + " ".join(f"{v:>8}" for v in versions)
          + f" {'spread%':>7} {'category per version':<24} changed")
    for row in rows:
        print(format_row(row, versions))
    print("   volumes in mL; * = the version's record carries a review flag (thick_slices aside); "
          "categories: grow/same/part/near/gone")
    for row in rows:
        for v, message in row["errors"].items():
            print(f"   error {row['participant_id']} {row['session_id']} version {v}: {message}")


def code_state():
    """The khe_vol measured: version, checkout commit and files changed under khe_vol/ (uncommitted code says so)."""
    import khe_vol

    root = Path(khe_vol.__file__).resolve().parents[1]

    def git(*args):
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None  # porcelain lines start with a space: no strip

    commit, changed = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "khe_vol")
    return {"khe_vol_version": khe_vol.__version__, "khe_vol_path": str(root), "commit": commit and commit.strip(),
            "khe_vol_changed_files": None if changed is None else sorted(line[3:] for line in changed.splitlines())}


def jobs_for(args, work_dir):
    jobs = [("variation", i) for i in range(args.participants)]
    jobs += [("dicom_demo", i) for i in range(len(DICOM_DEMO_PARTICIPANTS))]
    if not args.skip_real:
        jobs += [("brats", i) for i in range(len(real_labels(args.realdata)))]
    # The largest first, so two workers finish together.
    order = {"brats": 0, "variation": 1, "dicom_demo": 2}
    jobs.sort(key=lambda j: order[j[0]])
    return [(kind, i, str(work_dir), not args.skip_dicom, str(args.realdata)) for kind, i in jobs]


def run_all(jobs, n_workers):
    """Run every job on ``n_workers`` processes; results in the jobs' order, progress printed as they end."""
    results = [None] * len(jobs)
    with ProcessPoolExecutor(n_workers) as pool:
        futures = {pool.submit(run_subject, job): n for n, job in enumerate(jobs)}
        for future in as_completed(futures):
            result = future.result()
            results[futures[future]] = result
            print(f"   done {result['participant_id']}: {len(result['rows'])} series, "
                  f"{result['cpu_seconds']:.0f} CPU s", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=4, help="variation-cohort participants")
    parser.add_argument("--skip-real", action="store_true", help="leave out the real BraTS scans")
    parser.add_argument("--skip-dicom", action="store_true", help="leave out version d (DICOM round trip)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one subject each)")
    parser.add_argument("--realdata", default=str(REALDATA), help="folder of the real scans (brats2013)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="write every file under DIR and keep it")
    parser.add_argument("--out", default="results/benchmark_stability.json")
    args = parser.parse_args(argv)

    versions = [v for v in VERSIONS if not (v == "d" and args.skip_dicom)]
    if not args.skip_real and not real_labels(args.realdata):
        print(f"== real scans: {args.realdata} not found, skipped")
    code = code_state()
    changed = code["khe_vol_changed_files"]
    print(f"== khe_vol {code['khe_vol_version']} from {code['khe_vol_path']}, commit {code['commit'] or 'unknown'}"
          + (f", {len(changed)} file(s) changed under khe_vol/" if changed else ""), flush=True)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(args.keep).resolve() if args.keep else Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        jobs = jobs_for(args, work_dir)
        print(f"== {len(jobs)} subjects ({args.participants} variation, {len(DICOM_DEMO_PARTICIPANTS)} DICOM demo, "
              f"{sum(j[0] == 'brats' for j in jobs)} real), versions {', '.join(versions)}, "
              f"{args.jobs} workers", flush=True)
        results = run_all(jobs, args.jobs)
    cpu_s, wall_s = cpu_seconds() - cpu0, time.perf_counter() - wall0

    rows = [row for r in results for row in r["rows"]]
    problems = [p for r in results for p in r["problems"]]
    print("== per series")
    print_table(rows, versions)
    for problem in problems:
        print(f"   {problem}")
    summary = summarise(rows)
    summary["by_cohort"] = {c: {k: v for k, v in summarise([r for r in rows if r["cohort"] == c]).items()
                                if k not in ("over_1_pct", "changed", "targets_met")}
                            for c in dict.fromkeys(r["cohort"] for r in rows)}
    summary.update(cpu_seconds=round(cpu_s, 1), wall_seconds=round(wall_s, 1), workers=args.jobs)
    print("== summary")
    print(json.dumps(summary, indent=2))

    result = {"summary": summary, "code": code, "versions": {v: VERSIONS[v] for v in versions}, "series": rows,
              "problems": problems, "seeds_ras_mm": {r["participant_id"]: r["seed_ras_mm"] for r in results},
              "subject_cpu_seconds": {r["participant_id"]: round(r["cpu_seconds"], 1) for r in results},
              "targets": {"max_spread_pct": TARGET_MAX_SPREAD_PCT, "median_spread_pct": TARGET_MEDIAN_SPREAD_PCT,
                          "category_changes": 0}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
