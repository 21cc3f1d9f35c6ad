"""Which participant and session a DICOM study is: the visits table, or a month window.

**Visits table** (``--visits visits.tsv``, tab-separated): ``participant_id``,
``session_id`` and exactly one key column saying which study it is:

* ``study_instance_uid``: the study's StudyInstanceUID;
* ``accession_number``: its AccessionNumber (with an optional ``patient_id``
  column, the DICOM PatientID, checked too when given);
* ``study_date``: its StudyDate (``YYYY-MM-DD`` or ``YYYYMMDD``), with a
  required ``patient_id`` column (a date alone names no one).

An optional ``series_number`` column names the T2 series of that study when
the series rule finds none or several. Labels may be written with or without
``sub-`` / ``ses-``.

**Month window** (``--month-window M``): the table has ``participant_id`` and
``patient_id`` only. A participant's earliest study is the month-0 session
(the baseline); every other study is the session of the config's ``sessions``
whose month lies within ``M`` months of the study's months after the baseline
(days / 30.4375). A study within no session's window, or within two, is
reported, never guessed.

Either way, a study that fits no row is reported and not converted, and two
studies for one session are an error naming both (neither is converted).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from khe_vol.files import read_text_table, tsv_dict_reader

KEY_COLUMNS = ("study_instance_uid", "accession_number", "study_date")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
#: Mean month length, days.
DAYS_PER_MONTH = 365.25 / 12


class VisitsError(ValueError):
    """The visits table cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class Study:
    """What a study is known by (from its series' headers)."""

    study_instance_uid: str
    patient_id: str
    study_date: str
    accession_number: str


@dataclass(frozen=True)
class Match:
    """A study's participant and session (``problem`` set when there is none)."""

    participant_id: str | None = None
    session_id: str | None = None
    series_number: int | None = None
    problem: str | None = None


def _prefixed(value, prefix, path, line, column):
    label = value.strip().removeprefix(prefix)
    if not _LABEL.match(label):
        raise VisitsError(f"{path}, line {line}: {column} {value!r} is not a BIDS label (letters and digits)")
    return prefix + label


def _date(value, path, line):
    text = value.strip().replace("-", "")
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise VisitsError(f"{path}, line {line}: study_date {value!r} is not a date (YYYY-MM-DD)") from None
    if len(text) != 8:
        raise VisitsError(f"{path}, line {line}: study_date {value!r} is not a date (YYYY-MM-DD)")
    return text


def read_visits(path, month_window=False):
    """Read and check the visits table.

    Parameters
    ----------
    path : path-like
    month_window : bool
        The month-window rule: ``participant_id`` and ``patient_id`` only.

    Returns
    -------
    key : str or None
        The key column (:data:`KEY_COLUMNS`), None with ``month_window``.
    rows : list of dict
        ``participant_id`` / ``session_id`` with prefixes, ``key`` (the key value,
        dates as YYYYMMDD), ``patient_id``, ``series_number`` (int or None), ``line``.

    Raises
    ------
    VisitsError
    """
    rows = list(tsv_dict_reader(read_text_table(path, "visits table")))
    columns = set(rows[0]) if rows else set()
    if not rows:
        raise VisitsError(f"{path}: visits table has no rows")
    if month_window:
        key = None
        needed = {"participant_id", "patient_id"}
    else:
        keys = [c for c in KEY_COLUMNS if c in columns]
        if len(keys) != 1:
            raise VisitsError(f"{path}: the visits table needs exactly one of the columns {', '.join(KEY_COLUMNS)} "
                              f"(found {', '.join(keys) or 'none'})")
        key = keys[0]
        needed = {"participant_id", "session_id", key} | ({"patient_id"} if key == "study_date" else set())
    missing = sorted(needed - columns)
    if missing:
        raise VisitsError(f"{path}: visits table lacks column(s) {', '.join(missing)}")
    out = []
    for n, row in enumerate(rows, start=2):
        if not any((v or "").strip() for v in row.values()):
            continue
        empty = [c for c in sorted(needed) if not (row.get(c) or "").strip() or row[c].strip() == "n/a"]
        if empty:
            raise VisitsError(f"{path}, line {n}: empty {', '.join(empty)}")
        number = (row.get("series_number") or "").strip()
        if number and number != "n/a" and not number.isdigit():
            raise VisitsError(f"{path}, line {n}: series_number {number!r} is not a whole number")
        out.append({
            "participant_id": _prefixed(row["participant_id"], "sub-", path, n, "participant_id"),
            "session_id": (None if month_window
                           else _prefixed(row["session_id"], "ses-", path, n, "session_id")),
            "key": (None if key is None else _date(row[key], path, n) if key == "study_date" else row[key].strip()),
            "patient_id": (row.get("patient_id") or "").strip() or None,
            "series_number": int(number) if number.isdigit() else None,
            "line": n,
        })
    return key, out


def _study_key(study, key):
    return {"study_instance_uid": study.study_instance_uid, "accession_number": study.accession_number,
            "study_date": study.study_date}[key]


def match_by_table(studies, key, rows):
    """Each study's participant and session from the visits table (see the module docstring).

    Parameters
    ----------
    studies : list of Study
    key : str
        The key column.
    rows : list of dict
        From :func:`read_visits`.

    Returns
    -------
    dict
        study_instance_uid -> Match.
    """
    matches = {}
    for study in studies:
        found = [r for r in rows if r["key"] == _study_key(study, key)
                 and (r["patient_id"] is None or r["patient_id"] == study.patient_id)]
        if not found:
            matches[study.study_instance_uid] = Match(problem=f"study fits no row of the visits table (by {key}"
                                                      + (" and patient_id" if key == "study_date" else "") + ")")
        elif len({(r["participant_id"], r["session_id"]) for r in found}) > 1:
            lines = ", ".join(str(r["line"]) for r in found)
            matches[study.study_instance_uid] = Match(problem=f"study fits several rows of the visits table "
                                                      f"(lines {lines})")
        else:
            r = found[0]
            matches[study.study_instance_uid] = Match(r["participant_id"], r["session_id"], r["series_number"])
    return _one_study_per_session(matches)


def match_by_month_window(studies, rows, sessions, window_months):
    """Each study's participant and session by months after the participant's first study.

    Parameters
    ----------
    studies : list of Study
    rows : list of dict
        From :func:`read_visits` with ``month_window``: participant_id and patient_id.
    sessions : dict of str -> int
        Session label (without ``ses-``) -> month; the month-0 one is the baseline.
    window_months : float
        A study belongs to a session when within this many months of it.

    Returns
    -------
    dict
        study_instance_uid -> Match.
    """
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["participant_id"])
    matches = {}
    per_patient = {}
    for study in studies:
        pids = by_patient.get(study.patient_id)
        if not pids:
            matches[study.study_instance_uid] = Match(problem="its PatientID is in no row of the visits table")
        elif len(pids) > 1:
            matches[study.study_instance_uid] = Match(problem=f"its PatientID maps to {len(pids)} participants "
                                                      f"({', '.join(sorted(pids))}) in the visits table")
        elif len(study.study_date) != 8 or not study.study_date.isdigit():
            matches[study.study_instance_uid] = Match(problem="it has no StudyDate to place it in time")
        else:
            per_patient.setdefault(study.patient_id, []).append(study)
    for patient, patient_studies in per_patient.items():
        pid = next(iter(by_patient[patient]))
        dates = {s.study_instance_uid: dt.date(int(s.study_date[:4]), int(s.study_date[4:6]), int(s.study_date[6:]))
                 for s in patient_studies}
        baseline = min(dates.values())
        for s in patient_studies:
            months = (dates[s.study_instance_uid] - baseline).days / DAYS_PER_MONTH
            fits = [label for label, month in sessions.items() if abs(months - month) <= window_months]
            if len(fits) == 1:
                matches[s.study_instance_uid] = Match(pid, f"ses-{fits[0]}")
            else:
                what = "no session" if not fits else f"sessions {' and '.join(fits)}"
                matches[s.study_instance_uid] = Match(problem=f"{months:.1f} months after {pid}'s first study, "
                                                      f"within {window_months:g} months of {what}")
    return _one_study_per_session(matches)


def _one_study_per_session(matches):
    """Two studies for one session: both become a problem naming the other."""
    by_session = {}
    for uid, m in matches.items():
        if m.problem is None:
            by_session.setdefault((m.participant_id, m.session_id), []).append(uid)
    for (pid, sid), uids in by_session.items():
        if len(uids) > 1:
            for uid in uids:
                others = ", ".join(u for u in sorted(uids) if u != uid)
                matches[uid] = Match(pid, sid, problem=f"two or more studies for {pid} {sid}: this one and {others}; "
                                                       "remove one from the DICOM folder or the visits table")
    return matches
