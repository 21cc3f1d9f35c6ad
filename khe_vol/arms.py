"""Lesion response by randomised arm: ``response_by_arm.tsv``.

Input is the rows of ``response.tsv`` (dicts of strings, as
:func:`khe_vol.tables.response_rows` writes them) and the allocation
``{participant_id: arm}`` (:func:`read_allocation`). Output is a list of
rows (see :data:`ARM_COLUMNS`), one per endpoint and follow-up month, raw
numbers (``None`` = not estimable); :func:`write_response_by_arm` formats
them once.

Choices (also stated in the data dictionary):

* **Intention to treat.** The denominator of an arm is every participant
  allocated to it. A participant without a usable category at a month (no
  row, ``status=error``, a read still pending, ...) is a non-responder and
  is counted as ``not_assessed`` in the category rows, so the category
  counts of an arm add up to its n.
* **Difference** of rates (experimental minus control, arm order as
  configured) with the Newcombe (1998) hybrid score 95% CI (method 10:
  square-and-add of two Wilson intervals), from statsmodels.
* **Odds ratio** (odds of response, experimental over control) with the
  Woolf (logit) 95% CI, from statsmodels ``Table2x2``. When a cell of the
  2x2 table is 0 the Woolf interval does not exist; then 0.5 is added to
  all four cells (Haldane-Anscombe), as the Cochrane Handbook does, and the
  row's ``note`` says so. When no one responded in either arm, or
  everyone did, the table carries no information on the odds ratio: it is
  n/a with a note (the Cochrane Handbook likewise leaves such trials out).
* **p** is the two-sided Fisher exact test (scipy), defined in every case.
* Comparisons are made for the two response endpoints with exactly two
  arms. With another number of arms there is one row per arm and no
  comparison. Category rows are descriptive: counts only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from statsmodels.stats.contingency_tables import Table2x2
from statsmodels.stats.proportion import confint_proportions_2indep

from khe_vol.files import NA, read_text_table, tsv_dict_reader
from khe_vol.response import CATEGORIES, GOOD_RESPONSE, OVERALL_RESPONSE
from khe_vol.tables import RESPONSE_COLUMNS, write_table

#: Category of an allocated participant without a usable category at a month.
NOT_ASSESSED = "not_assessed"
#: Categories counted per arm; their counts add up to the arm's n.
ARM_CATEGORIES = (*CATEGORIES, NOT_ASSESSED)

OVERALL = "overall_response"
GOOD = "good_response"
#: Responder sets of the compared endpoints.
RESPONSE_ENDPOINTS = {OVERALL: OVERALL_RESPONSE, GOOD: GOOD_RESPONSE}
CATEGORY_PREFIX = "category:"

#: Default primary endpoint month (months after baseline).
PRIMARY_MONTH = 12

ALPHA = 0.05
#: Added to every cell of a 2x2 table with a zero cell (Haldane-Anscombe).
ZERO_CELL_ADD = 0.5

ALLOCATION_COLUMNS = ("participant_id", "arm")

#: How each value is computed: stated once, in the data dictionary's column
#: descriptions (not repeated on every row).
METHOD_DIFFERENCE = ("statsmodels confint_proportions_2indep(method='newcomb', compare='diff'): Newcombe (1998) "
                     "hybrid score interval, method 10 (square-and-add of the two Wilson intervals)")
METHOD_ODDS_RATIO = ("statsmodels Table2x2(shift_zeros=False).oddsratio and .oddsratio_confint(method='normal'): "
                     "Woolf (logit) interval")
METHOD_FISHER = "scipy.stats.fisher_exact(alternative='two-sided')"
#: Said in the note of a row whose odds ratio needed the zero-cell correction.
ZERO_CELL_NOTE = (f"odds ratio and its CI computed after adding {ZERO_CELL_ADD} to all four cells "
                  "(Haldane-Anscombe) as a cell is 0")

ARM_COLUMNS = {
    "endpoint": {
        "LongName": "Endpoint",
        "Description": "What is counted. Every allocated participant is in the denominator (intention to treat); one without a usable category at the month is a non-responder.",
        "Levels": {
            OVERALL: "Overall lesion response: complete, nearly complete or partial involution.",
            GOOD: "Good lesion response: complete or nearly complete involution.",
            **{
                f"{CATEGORY_PREFIX}{name}": f"Participants in category {name} ({text}); descriptive, not compared."
                for name, text in RESPONSE_COLUMNS["category"]["Levels"].items()
            },
            f"{CATEGORY_PREFIX}{NOT_ASSESSED}": "Allocated participants without a usable category at the month (no follow-up series, status=error, a pending read, ...); descriptive, not compared.",
        },
    },
    "month": {"LongName": "Follow-up month", "Description": "Months after baseline, from the config sessions mapping.", "Units": "month"},
    "primary": {"LongName": "Primary endpoint month", "Description": "Whether month is the primary endpoint month (config primary_month).", "Levels": {"1": "primary month", "0": "other follow-up month"}},
    "arm_1": {"LongName": "Arm 1", "Description": "With two arms, the experimental arm (first in config arms); with another number of arms, the arm of the row."},
    "n_1": {"LongName": "Participants in arm 1", "Description": "Participants allocated to arm 1 (intention-to-treat denominator)."},
    "responders_1": {"LongName": "Participants with the endpoint in arm 1", "Description": "Responders for a response endpoint; participants in the category for a category endpoint."},
    "rate_1_pct": {"LongName": "Rate in arm 1", "Description": "100 x responders_1 / n_1.", "Units": "%"},
    "arm_2": {"LongName": "Arm 2", "Description": "The control arm (second in config arms); n/a with another number of arms than two."},
    "n_2": {"LongName": "Participants in arm 2", "Description": "As n_1, for arm 2."},
    "responders_2": {"LongName": "Participants with the endpoint in arm 2", "Description": "As responders_1, for arm 2."},
    "rate_2_pct": {"LongName": "Rate in arm 2", "Description": "100 x responders_2 / n_2.", "Units": "%"},
    "difference_pct": {"LongName": "Difference of rates", "Description": "rate_1_pct - rate_2_pct (experimental minus control), in percentage points.", "Units": "%"},
    "difference_ci_low_pct": {"LongName": "Lower 95% confidence limit of the difference", "Description": f"Computed with {METHOD_DIFFERENCE}.", "Units": "%"},
    "difference_ci_high_pct": {"LongName": "Upper 95% confidence limit of the difference", "Description": "As difference_ci_low_pct.", "Units": "%"},
    "odds_ratio": {"LongName": "Odds ratio", "Description": f"Odds of the endpoint in arm 1 over the odds in arm 2. When a cell of the 2x2 table is 0, computed after adding 0.5 to all four cells (Haldane-Anscombe; the row's note says so). n/a when no one or everyone had the endpoint in both arms (not estimable; see note). Computed with {METHOD_ODDS_RATIO}."},
    "odds_ratio_ci_low": {"LongName": "Lower 95% confidence limit of the odds ratio", "Description": f"Woolf (logit) interval: exp(ln OR - 1.96 sqrt(1/a + 1/b + 1/c + 1/d)), on the corrected cells when one is 0. Computed with {METHOD_ODDS_RATIO}."},
    "odds_ratio_ci_high": {"LongName": "Upper 95% confidence limit of the odds ratio", "Description": "As odds_ratio_ci_low, with +."},
    "fisher_p": {"LongName": "Fisher exact p-value", "Description": f"Two-sided Fisher exact test of the 2x2 table arm x endpoint (uncorrected counts), computed with {METHOD_FISHER}."},
    "note": {"LongName": "Note", "Description": "Why a value is n/a or was corrected (the zero-cell correction of the odds ratio); and, on every row, the participants the allocation and the imaging disagree on (allocated but never imaged: non-responders; imaged but not allocated: not counted). The same list is in this dictionary's Provenance.AllocationMismatches."},
}

_FORMATS = {
    "n_1": "d", "responders_1": "d", "n_2": "d", "responders_2": "d",
    "rate_1_pct": ".2f", "rate_2_pct": ".2f",
    "difference_pct": ".2f", "difference_ci_low_pct": ".2f", "difference_ci_high_pct": ".2f",
    "odds_ratio": ".4f", "odds_ratio_ci_low": ".4f", "odds_ratio_ci_high": ".4f",
    # p-values span many decades: significant digits, not decimals.
    "fisher_p": ".4g",
}


# ---------------------------------------------------------------- allocation


def read_allocation(path, known_participants=(), arms=None):
    """Read the allocation TSV (``participant_id``, ``arm``; other columns ignored).

    Parameters
    ----------
    path : path-like
        TSV with a header line; ``participant_id`` is ``sub-<label>`` as in the
        imaging folder.
    known_participants : iterable of str
        Participants with imaging (``sub-<label>``).
    arms : sequence of str, optional
        Allowed arm names (config ``arms``); ``None`` accepts any non-empty name.

    Returns
    -------
    allocation : dict
        ``{participant_id: arm}`` of every allocated participant, with or
        without imaging (intention to treat counts them all).
    warnings : list of str
        Participants with imaging but not allocated (not counted), and
        allocated participants without any imaging (counted as non-responders).

    Raises
    ------
    ValueError
        Naming the file and line: empty file, missing column, empty or
        malformed participant_id, duplicate participant, arm not in ``arms``.
    """
    allowed = None if arms is None else list(arms)
    allocation, first_line = {}, {}
    # Spreadsheets save a byte-order mark, or UTF-16 ("Unicode Text"): read_text_table takes both.
    reader = tsv_dict_reader(read_text_table(path, "allocation"))
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(ALLOCATION_COLUMNS)}")
    missing = [col for col in ALLOCATION_COLUMNS if col not in header]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (tab-separated header has: {', '.join(header)})"
        )
    reader.fieldnames = header
    for row in reader:
        line = reader.line_num
        pid = (row.get("participant_id") or "").strip()
        arm = (row.get("arm") or "").strip()
        if not pid.startswith("sub-") or pid == "sub-":
            raise ValueError(f"{path}, line {line}: participant_id {pid!r} is not sub-<label> as in the imaging folder")
        if pid in allocation:
            raise ValueError(f"{path}, line {line}: {pid} is allocated twice (first at line {first_line[pid]})")
        if not arm:
            raise ValueError(f"{path}, line {line}: {pid} has no arm")
        if allowed is not None and arm not in allowed:
            raise ValueError(f"{path}, line {line}: arm {arm!r} of {pid} is not one of the configured arms ({', '.join(allowed)})")
        allocation[pid] = arm
        first_line[pid] = line
    if not allocation:
        raise ValueError(f"{path}: no participants (header only)")
    warnings = [f"{path}: {pid} {what}" for pid, what in allocation_mismatches(allocation, known_participants)]
    return allocation, warnings


_NOT_ALLOCATED = "has imaging but is not in the allocation: not counted in response_by_arm"
_NOT_IMAGED = "is allocated but has no imaging: counted as a non-responder (not_assessed) at every month (intention to treat)"


def allocation_mismatches(allocation, imaged_participants):
    """Participants the allocation and the imaging folder disagree on.

    Parameters
    ----------
    allocation : dict
        ``{participant_id: arm}``.
    imaged_participants : iterable of str
        Participants with at least one T2w series.

    Returns
    -------
    list of (participant_id, what)
        Imaged but not allocated (not counted anywhere in the by-arm table),
        then allocated but never imaged (non-responders), each sorted.
    """
    imaged, allocated = set(imaged_participants), set(allocation)
    return [(pid, _NOT_ALLOCATED) for pid in sorted(imaged - allocated)] + [
        (pid, _NOT_IMAGED) for pid in sorted(allocated - imaged)
    ]


def allocation_note(mismatches):
    """One line for the note of every by-arm row: whom the table leaves out or counts unseen.

    Parameters
    ----------
    mismatches : list of (participant_id, what)
        As :func:`allocation_mismatches` returns.

    Returns
    -------
    str
        Empty when the allocation and the imaging agree.
    """
    parts = []
    not_allocated = [pid for pid, what in mismatches if what == _NOT_ALLOCATED]
    not_imaged = [pid for pid, what in mismatches if what == _NOT_IMAGED]
    if not_imaged:
        parts.append(f"allocated but never imaged (counted as not_assessed, a non-responder): {', '.join(not_imaged)}")
    if not_allocated:
        parts.append(f"imaged but not allocated (not counted): {', '.join(not_allocated)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- counting


def categories_by_month(response_rows, participants, months):
    """Category of every participant at every month; missing or unusable = not assessed.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings): ``participant_id``, ``month``,
        ``category``, ``status``.
    participants : iterable of str
        Participants to count (the allocated ones); others' rows are ignored.
    months : iterable of int
        Follow-up months, in months after baseline.

    Returns
    -------
    dict
        ``{month: {participant_id: category}}``, a category of
        :data:`ARM_CATEGORIES` for every participant and month.
    """
    months = list(months)
    participants = list(participants)
    counted = set(participants)
    found = {}
    for row in response_rows:
        pid = row["participant_id"]
        if pid not in counted:
            continue
        try:
            month = int(row["month"])
        except ValueError:
            raise ValueError(f"response row of {pid} {row.get('session_id')}: month {row['month']!r} is not a whole number") from None
        if month not in months:
            continue
        if (pid, month) in found:
            raise ValueError(f"{pid} has two response rows at month {month}: two sessions map to the same month")
        usable = row.get("status") == "ok" and row.get("category") in CATEGORIES
        found[(pid, month)] = row["category"] if usable else NOT_ASSESSED
    return {m: {pid: found.get((pid, m), NOT_ASSESSED) for pid in participants} for m in months}


def count_endpoint(categories, participants, endpoint):
    """Allocated participants and those with the endpoint.

    Parameters
    ----------
    categories : dict
        ``{participant_id: category}`` at one month (every participant).
    participants : list of str
        Participants of one arm.
    endpoint : str
        ``overall_response``, ``good_response`` or ``category:<name>``.

    Returns
    -------
    n : int
    responders : int
    """
    if endpoint in RESPONSE_ENDPOINTS:
        hits = RESPONSE_ENDPOINTS[endpoint]
    else:
        hits = {endpoint[len(CATEGORY_PREFIX):]}
    return len(participants), sum(categories[pid] in hits for pid in participants)


# ---------------------------------------------------------------- comparison


def compare_two_arms(responders_1, n_1, responders_2, n_2):
    """Difference of rates, odds ratio and Fisher p of two arms.

    Parameters
    ----------
    responders_1, n_1 : int
        Responders and participants of the experimental arm.
    responders_2, n_2 : int
        Same for the control arm.

    Returns
    -------
    dict
        ``difference_pct``, ``difference_ci_low_pct``,
        ``difference_ci_high_pct`` (percentage points), ``odds_ratio``,
        ``odds_ratio_ci_low``, ``odds_ratio_ci_high``, ``fisher_p``,
        ``note``; ``None`` where not estimable. How each is computed is
        in the data dictionary (:data:`ARM_COLUMNS`), not in the rows.
    """
    out = dict.fromkeys(
        ("difference_pct", "difference_ci_low_pct", "difference_ci_high_pct",
         "odds_ratio", "odds_ratio_ci_low", "odds_ratio_ci_high", "fisher_p", "note")
    )
    if n_1 == 0 or n_2 == 0:
        out["note"] = "an arm has no allocated participants: no comparison"
        return out
    low, high = confint_proportions_2indep(
        responders_1, n_1, responders_2, n_2, method="newcomb", compare="diff", alpha=ALPHA
    )
    out["difference_pct"] = 100 * (responders_1 / n_1 - responders_2 / n_2)
    out["difference_ci_low_pct"] = 100 * float(low)
    out["difference_ci_high_pct"] = 100 * float(high)
    # Rows: arms (experimental first); columns: with, without the endpoint.
    cells = np.array([[responders_1, n_1 - responders_1], [responders_2, n_2 - responders_2]])
    out["fisher_p"] = float(stats.fisher_exact(cells, alternative="two-sided").pvalue)
    if responders_1 + responders_2 == 0:
        out["note"] = "odds ratio not estimable: no responders in either arm"
    elif responders_1 + responders_2 == n_1 + n_2:
        out["note"] = "odds ratio not estimable: every participant responded in both arms"
    else:
        if cells.min() == 0:
            # statsmodels' shift_zeros replaces only the zero cells by 0.5
            # (statsmodels issue #7011), which is not the Haldane-Anscombe
            # correction: add 0.5 to every cell here, and say so.
            cells = cells + ZERO_CELL_ADD
            out["note"] = ZERO_CELL_NOTE
        table = Table2x2(cells, shift_zeros=False)
        or_low, or_high = table.oddsratio_confint(alpha=ALPHA, method="normal")
        out["odds_ratio"] = float(table.oddsratio)
        out["odds_ratio_ci_low"] = float(or_low)
        out["odds_ratio_ci_high"] = float(or_high)
    return out


# ---------------------------------------------------------------- table


def _ordered_months(months, primary_month):
    """Primary month first, then the other follow-up months ascending (month 0 dropped)."""
    months = sorted({int(m) for m in months} - {0})
    if primary_month <= 0:
        raise ValueError(f"primary_month must be a follow-up month (> 0), got {primary_month}")
    if primary_month not in months:
        raise ValueError(
            f"primary_month {primary_month} is not a follow-up month of the sessions ({', '.join(map(str, months)) or 'none'})"
        )
    return [primary_month] + [m for m in months if m != primary_month]


def _arm_columns(index, arm, n, responders):
    return {
        f"arm_{index}": arm,
        f"n_{index}": n,
        f"responders_{index}": responders,
        f"rate_{index}_pct": 100 * responders / n if n else None,
    }


def response_by_arm(response_rows, allocation, arms, months, primary_month=PRIMARY_MONTH, note=""):
    """Response rates per arm at every follow-up month, and their comparison.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows as strings (``participant_id``, ``month``,
        ``category``, ``status``, ...).
    allocation : dict
        ``{participant_id: arm}`` of every allocated participant.
    arms : sequence of str
        Arm names in report order; with two arms, the experimental arm first.
    months : iterable of int
        Follow-up months (months after baseline) to report; 0 is dropped.
    primary_month : int
        Primary endpoint month; must be one of ``months``.
    note : str
        Added to every row's note, e.g. :func:`allocation_note`: a reader of
        any one row learns whom the table leaves out or counts unseen.

    Returns
    -------
    list of dict
        Rows with the keys of :data:`ARM_COLUMNS`, numbers unformatted
        (``None`` = not estimable): primary month first, then the other
        months ascending; per month overall response, good response, then
        each of :data:`ARM_CATEGORIES`. With two arms one row per endpoint;
        otherwise one row per endpoint and arm, without comparison.
    """
    arms = list(arms)
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"arms must be distinct names, got {arms}")
    stray = sorted({arm for arm in allocation.values() if arm not in arms})
    if stray:
        raise ValueError(f"allocation has arm(s) {', '.join(stray)} not in the configured arms ({', '.join(arms)})")
    ordered = _ordered_months(months, primary_month)
    members = {arm: sorted(pid for pid, a in allocation.items() if a == arm) for arm in arms}
    by_month = categories_by_month(response_rows, sorted(allocation), ordered)
    endpoints = [*RESPONSE_ENDPOINTS, *(CATEGORY_PREFIX + c for c in ARM_CATEGORIES)]
    rows = []
    for month in ordered:
        for endpoint in endpoints:
            head = {"endpoint": endpoint, "month": month, "primary": int(month == primary_month)}
            counts = [count_endpoint(by_month[month], members[arm], endpoint) for arm in arms]
            if len(arms) != 2:
                for arm, (n, hits) in zip(arms, counts):
                    rows.append({
                        **head, **_arm_columns(1, arm, n, hits),
                        "note": f"comparison needs exactly 2 arms ({len(arms)} configured)",
                    })
                continue
            row = {**head, **_arm_columns(1, arms[0], *counts[0]), **_arm_columns(2, arms[1], *counts[1])}
            if endpoint in RESPONSE_ENDPOINTS:
                row.update(compare_two_arms(counts[0][1], counts[0][0], counts[1][1], counts[1][0]))
            else:
                row.update(note="category counts are descriptive: no comparison")
            rows.append(row)
    if note:
        for row in rows:
            row["note"] = f"{row['note']}; {note}" if row.get("note") else note
    return rows


def _present(row):
    """Row of strings for the TSV: numbers formatted once, here."""
    out = {}
    for col in ARM_COLUMNS:
        value = row.get(col)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            out[col] = NA
        elif col in _FORMATS:
            out[col] = format(value, _FORMATS[col])
        else:
            out[col] = str(value)
    return out


def write_response_by_arm(path, rows, provenance=None):
    """Write ``response_by_arm.tsv`` and its JSON data dictionary (``.json``) atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.tsv``.
    rows : list of dict
        As :func:`response_by_arm` returns.
    """
    write_table(path, ARM_COLUMNS, [_present(r) for r in rows], provenance)
