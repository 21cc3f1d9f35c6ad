"""Finding the T2 series, reader masks and seeds of a study.

Discovery only reads directory listings and the seeds table; image contents
are checked later, series by series (:mod:`khe_vol.nifti`). Every problem is
kept with the series it concerns, so one bad file never hides the others.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from khe_vol.files import read_text_table, tsv_dict_reader

_LABEL = r"[A-Za-z0-9]+"
_T2W = re.compile(
    rf"^sub-(?P<sub>{_LABEL})_ses-(?P<ses>{_LABEL})(?P<entities>(?:_{_LABEL}-{_LABEL})*)_T2w\.nii(?:\.gz)?$"
)
#: Reader masks: NIfTI label maps (ITK-SNAP) or 3D Slicer segmentations / NRRD label maps.
_MASK_FILE = re.compile(r"\.(?:nii(?:\.gz)?|nrrd)$")
_MASK = re.compile(rf"^sub-(?P<sub>{_LABEL})_ses-(?P<ses>{_LABEL})_label-lesion_mask\.(?:nii(?:\.gz)?|seg\.nrrd|nrrd)$")
_NIFTI = re.compile(r"\.nii(\.gz)?$")
#: Files never opened to look for DICOM: NIfTI, and the text files BIDS puts beside them.
_NOT_DICOM = re.compile(r"\.(?:nii(?:\.gz)?|json|tsv|txt|md|bval|bvec)$", re.IGNORECASE)
#: DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name.
_DICOM_MAGIC_OFFSET, _DICOM_MAGIC = 128, b"DICM"
_DICOM_SUFFIX = re.compile(r"\.(?:dcm|dicom|ima)$", re.IGNORECASE)


@dataclass(frozen=True)
class SeriesSlot:
    """One participant x session of the study, with what discovery found.

    ``path`` is the chosen T2w series (``None`` if there is none usable);
    ``problem`` is a coordinator-readable reason this slot cannot be measured,
    or ``None``. ``month`` is ``None`` for a session label the config does not know.
    """

    participant_id: str
    session_id: str
    month: int | None
    path: Path | None
    problem: str | None = None


@dataclass(frozen=True)
class Seed:
    """A reader's click inside the lesion, in scanner RAS+ millimetres."""

    participant_id: str
    session_id: str
    seed_ras_mm: tuple[float, float, float]


@dataclass
class Study:
    """Everything discovered about a study before any image is opened."""

    slots: list[SeriesSlot]
    masks: dict[tuple[str, str], Path]
    seeds: dict[tuple[str, str], Seed]
    #: participant_id -> problem with that participant's seed rows
    seed_problems: dict[str, str] = field(default_factory=dict)
    #: problems not tied to one series (stray files, seeds for unknown participants)
    problems: list[str] = field(default_factory=list)

    def slot(self, participant_id, session_id):
        for s in self.slots:
            if s.participant_id == participant_id and s.session_id == session_id:
                return s
        raise KeyError((participant_id, session_id))


def _entities(text):
    return dict(pair.split("-", 1) for pair in text.strip("_").split("_") if pair)


def _walk_anat(root, pattern, kind, suffix=None):
    """Yield (sub, ses, path, match) for NIfTI files (or ``suffix`` files) under sub-*/ses-*/anat.

    Files whose names do not fit ``pattern`` or whose folders disagree with
    their names are returned as problems instead.
    """
    found, problems = [], []
    for path in sorted(root.glob("sub-*/ses-*/anat/*")):
        if not (suffix or _NIFTI).search(path.name):
            continue
        m = pattern.match(path.name)
        if m is None:
            if kind == "T2w" and "_T2w." not in path.name:
                continue  # other BIDS suffixes (T1w, ...) are not ours to judge
            problems.append(f"{path}: file name does not follow the {kind} naming pattern; ignored")
            continue
        sub_dir, ses_dir = path.parts[-4], path.parts[-3]
        if sub_dir != f"sub-{m['sub']}" or ses_dir != f"ses-{m['ses']}":
            problems.append(
                f"{path}: file name says sub-{m['sub']}/ses-{m['ses']} but it lies in "
                f"{sub_dir}/{ses_dir}; ignored"
            )
            continue
        found.append((f"sub-{m['sub']}", f"ses-{m['ses']}", path, m))
    return found, problems


def is_dicom(path):
    """Whether a file is DICOM: the 'DICM' marker at byte 128, or a DICOM file name suffix.

    Parameters
    ----------
    path : pathlib.Path
        A regular file.

    Returns
    -------
    bool
    """
    if _DICOM_SUFFIX.search(path.name):
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            return fh.read(len(_DICOM_MAGIC)) == _DICOM_MAGIC
    except OSError:
        return False


def find_dicom(imaging_dir):
    """Folders under the imaging folder holding DICOM files, one problem per folder.

    khe-vol reads NIfTI only, so DICOM files would be skipped without a word:
    each folder holding any is named with its count, an example file and what
    to do (convert to NIfTI, named as the imaging folder expects).

    Parameters
    ----------
    imaging_dir : path-like
        Root of the imaging folder.

    Returns
    -------
    list of str
        One coordinator-readable problem per folder with DICOM files, sorted.
    """
    root = Path(imaging_dir)
    by_folder: dict[Path, list[str]] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if not _NOT_DICOM.search(name) and path.is_file() and is_dicom(path):
                by_folder.setdefault(Path(folder), []).append(name)
    problems = []
    for folder, names in sorted(by_folder.items()):
        n = len(names)
        problems.append(
            f"{folder}: {n} DICOM file{'s' if n > 1 else ''} (e.g. {names[0]}) not read: khe-vol measures NIfTI only. "
            "Move the DICOM files out of the imaging folder and convert them with `khe-vol import DICOM_DIR "
            f"--out {root} --visits visits.tsv` (dcm2niix, de-identified; README: Importing DICOM)"
        )
    return problems


def find_series(imaging_dir, sessions, series_select=None):
    """List the T2w series of a BIDS-like folder, one slot per participant x session.

    Parameters
    ----------
    imaging_dir : path-like
        Root of the imaging folder.
    sessions : dict of str -> int
        Session label (without ``ses-``) -> month.
    series_select : dict of str -> str, optional
        Entities a series must carry to be chosen when a session holds several.

    Returns
    -------
    slots : list of SeriesSlot
        Sorted by participant then month; slots with problems included.
    problems : list of str
        Problems with files that belong to no slot, and folders of DICOM
        files (:func:`find_dicom`).
    """
    root = Path(imaging_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: imaging folder does not exist")
    series_select = series_select or {}
    found, problems = _walk_anat(root, _T2W, "T2w")
    problems += find_dicom(root)
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for sub, ses, path, m in found:
        groups.setdefault((sub, ses), []).append((path, _entities(m["entities"])))

    slots = []
    for (sub, ses), candidates in groups.items():
        label = ses[len("ses-"):]
        month = sessions.get(label)
        problem = None
        chosen = candidates
        if len(candidates) > 1 and series_select:
            chosen = [
                c for c in candidates
                if all(c[1].get(k) == v for k, v in series_select.items())
            ]
        if len(chosen) == 1:
            path = chosen[0][0]
        else:
            path = None
            names = ", ".join(str(c[0]) for c in candidates)
            if chosen:
                problem = f"{len(chosen)} T2w series in one session: {names}; set series_select to choose one"
            else:
                problem = f"no T2w series matches series_select {series_select}: {names}"
        if month is None:
            known = ", ".join(f"ses-{k}" for k in sessions)
            problem = (
                f"{path or candidates[0][0]}: session label '{ses}' is not in the config "
                f"sessions ({known}); add it with its month"
            )
        slots.append(SeriesSlot(sub, ses, month, path, problem))
    slots.sort(key=lambda s: (s.participant_id, s.month if s.month is not None else math.inf, s.session_id))
    return slots, problems


def find_masks(masks_dir):
    """Reader masks by (participant_id, session_id), and problems with stray files."""
    if masks_dir is None:
        return {}, []
    root = Path(masks_dir)
    if not root.is_dir():
        return {}, [f"{root}: masks folder does not exist"]
    found, problems = _walk_anat(root, _MASK, "label-lesion_mask", _MASK_FILE)
    masks = {}
    for sub, ses, path, _ in found:
        if (sub, ses) in masks:
            problems.append(f"{path}: second reader mask for {sub}/{ses} (also {masks[(sub, ses)]}); ignored")
            continue
        masks[(sub, ses)] = path
    return masks, problems


def read_seeds(seeds_path, baseline_label):
    """Parse the seeds TSV.

    Parameters
    ----------
    seeds_path : path-like or None
        TSV with ``participant_id, x, y, z`` and optional ``session_id``
        (RAS+ mm); ``None`` for no seeds.
    baseline_label : str
        Session label (without ``ses-``) a seed row without ``session_id`` refers to.

    Returns
    -------
    seeds : dict of (participant_id, session_id) -> Seed
    problems : dict of participant_id -> str
        Rows that could not be read, by participant (their series get an error).

    Raises
    ------
    ValueError
        If the file cannot be read or decoded (see :func:`read_text_table`:
        UTF-8 with or without a byte-order mark, UTF-16 with one), or lacks a
        required column.
    """
    if seeds_path is None:
        return {}, {}
    path = Path(seeds_path)
    try:
        text = read_text_table(path, "seeds table")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read seeds table: {exc}") from exc
    rows = list(tsv_dict_reader(text, quoted=True))
    columns = set(rows[0].keys()) if rows else set()
    missing = {"participant_id", "x", "y", "z"} - columns
    if rows and missing:
        raise ValueError(f"{path}: seeds table lacks column(s) {', '.join(sorted(missing))}")
    seeds, problems = {}, {}
    for line_no, row in enumerate(rows, start=2):
        pid = (row.get("participant_id") or "").strip()
        if not pid.startswith("sub-"):
            pid = f"sub-{pid}"
        ses = (row.get("session_id") or "").strip() or f"ses-{baseline_label}"
        if ses.lower() == "n/a":
            ses = f"ses-{baseline_label}"
        if not ses.startswith("ses-"):
            ses = f"ses-{ses}"
        try:
            xyz = tuple(float(row[c]) for c in ("x", "y", "z"))
            if not all(math.isfinite(v) for v in xyz):
                raise ValueError("not finite")
        except (TypeError, ValueError):
            problems[pid] = f"{path} line {line_no}: seed x/y/z must be numbers in RAS+ mm, got {row.get('x')!r}, {row.get('y')!r}, {row.get('z')!r}"
            continue
        if (pid, ses) in seeds:
            problems[pid] = f"{path} line {line_no}: a second seed for {pid} {ses}"
            continue
        seeds[(pid, ses)] = Seed(pid, ses, xyz)
    return seeds, problems


def discover_study(config):
    """Slots, masks and seeds of a validated config (see :mod:`khe_vol.config`)."""
    from khe_vol.config import baseline_session

    baseline = baseline_session(config)
    slots, problems = find_series(config["imaging_dir"], config["sessions"], config.get("series_select"))
    masks, mask_problems = find_masks(config.get("masks_dir"))
    seeds, seed_problems = read_seeds(config.get("seeds"), baseline)
    participants = {s.participant_id for s in slots}
    for (pid, ses) in sorted(seeds):
        if pid not in participants:
            problems.append(f"{config['seeds']}: seed for {pid}, who has no T2w series in {config['imaging_dir']}")
        elif not any(s.participant_id == pid and s.session_id == ses for s in slots):
            problems.append(f"{config['seeds']}: seed for {pid} {ses}, a session with no T2w series")
    slot_keys = {(s.participant_id, s.session_id) for s in slots}
    for key, path in sorted(masks.items()):
        if key not in slot_keys:
            mask_problems.append(f"{path}: reader mask for a series that does not exist; ignored")
    return Study(slots, masks, seeds, seed_problems, problems + mask_problems)


@dataclass(frozen=True)
class MissingVisit:
    """An expected visit with no T2w series (see :func:`missing_visits`)."""

    participant_id: str
    session_id: str
    month: int
    #: The participant's last visit with a series, which makes this one expected.
    last_session_id: str
    last_month: int

    @property
    def message(self):
        """What a coordinator reads in ``check.tsv`` and the tables' ``message``."""
        pid, ses = self.participant_id, self.session_id
        return (f"no T2w series for {pid} {ses} (month {self.month}): an expected visit, since {pid} has a later one "
                f"({self.last_session_id}, month {self.last_month}); put its series in imaging_dir as "
                f"{pid}/{ses}/anat/{pid}_{ses}_T2w.nii.gz, or keep this row as the record that the visit is missing")


def missing_visits(visits, sessions):
    """Expected visits with no series: each participant's config sessions up to their last one present.

    A participant's expected visits are the config ``sessions`` whose month
    is at most the month of that participant's last session with a T2w
    series (whatever became of that series). A visit after the last one (a
    participant who left the study, or a visit not yet due) cannot be told
    from one that will come and is not listed; the by-arm analysis counts a
    participant without a category at a month as not assessed either way.

    Parameters
    ----------
    visits : iterable of (participant_id, session_id, month)
        Every participant x session found (``month`` None for a session label
        the config does not know: it makes no visit expected).
    sessions : dict of str -> int
        Config sessions: label (without ``ses-``) -> month.

    Returns
    -------
    list of MissingVisit
        Sorted by participant, then month. Of several labels with one month,
        only the first (by label) is expected, and none when any is present.
    """
    found: dict[str, dict[int, str]] = {}
    for pid, ses, month in visits:
        months = found.setdefault(pid, {})
        if month is not None:
            months.setdefault(int(month), ses)
    schedule = sorted((int(month), label) for label, month in sessions.items())
    missing = []
    for pid in sorted(found):
        months = found[pid]
        if not months:
            continue
        last = max(months)
        listed = set()
        for month, label in schedule:
            if month <= last and month not in months and month not in listed:
                listed.add(month)
                missing.append(MissingVisit(pid, f"ses-{label}", month, months[last], last))
    return missing


def study_missing_visits(study, sessions):
    """:func:`missing_visits` of a discovered study."""
    return missing_visits(((s.participant_id, s.session_id, s.month) for s in study.slots), sessions)


def reference_session(study, participant_id, baseline_session_id):
    """The session a participant's other sessions are tracked from, or ``None``.

    The seeded session (the baseline by default), else the baseline if a reader
    mask covers it, else the earliest session with a reader mask.
    """
    seeded = sorted(ses for (pid, ses) in study.seeds if pid == participant_id)
    if f"{baseline_session_id}" in seeded:
        return baseline_session_id
    slots = [s for s in study.slots if s.participant_id == participant_id and s.month is not None]
    if seeded:
        by_month = {s.session_id: s.month for s in slots}
        return min(seeded, key=lambda ses: (by_month.get(ses, math.inf), ses))
    if (participant_id, baseline_session_id) in study.masks:
        return baseline_session_id
    for s in slots:
        if (participant_id, s.session_id) in study.masks:
            return s.session_id
    return None
