"""The end-of-run summary's lines on what needs a reader and which visits are missing.

A coordinator reads the summary Snakemake prints at the end of a run before
any table: it says how many series and categories ask for a reader's review
and why (counts per ``review_reason``), and which expected visits have no
series. Counted from the tables' own rows, so the summary and the tables agree.
"""

from __future__ import annotations

from collections import Counter

#: Missing visits named one by one in the summary; more are counted.
NAMED_MISSING = 10


def review_counts(rows):
    """Rows that need review, and how often each reason applies among them.

    Parameters
    ----------
    rows : list of dict
        ``volumes.tsv`` or ``response.tsv`` rows (strings).

    Returns
    -------
    n_flagged : int
        Rows with ``needs_review=1``.
    reasons : collections.Counter
        ``review_reason`` code -> number of those rows it applies to.
    """
    flagged = [row for row in rows if row.get("needs_review") == "1"]
    reasons = Counter(code for row in flagged for code in (row.get("review_reason") or "").split(";")
                      if code and code != "n/a")
    return len(flagged), reasons


def _reasons_text(reasons):
    return ", ".join(f"{code} {n}" for code, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0])))


def review_line(volume_rows, response_rows):
    """One summary line: series and categories that need review, with counts per reason.

    Parameters
    ----------
    volume_rows, response_rows : list of dict
        Rows of ``volumes.tsv`` and ``response.tsv`` (strings).

    Returns
    -------
    str
    """
    n_series, series_reasons = review_counts(volume_rows)
    n_categories, category_reasons = review_counts(response_rows)
    series = sum(row.get("status") != "missing" for row in volume_rows)
    classified = sum(row.get("status") == "ok" for row in response_rows)
    if not n_series and not n_categories:
        return f"  needs review: none of {series} series and {classified} category(ies)"
    parts = []
    if n_series:
        parts.append(f"{n_series} of {series} series ({_reasons_text(series_reasons)})")
    if n_categories:
        parts.append(f"{n_categories} of {classified} category(ies) ({_reasons_text(category_reasons)})")
    return (f"  NEEDS REVIEW: {'; '.join(parts)}: rows with needs_review=1 in volumes.tsv / response.tsv, "
            "review_reason says why (README: Review reasons)")


def missing_line(missing):
    """One summary line naming the expected visits with no series, or None when there are none.

    Parameters
    ----------
    missing : sequence of khe_vol.discover.MissingVisit

    Returns
    -------
    str or None
    """
    if not missing:
        return None
    names = ", ".join(f"{v.participant_id} {v.session_id}" for v in missing[:NAMED_MISSING])
    more = f" and {len(missing) - NAMED_MISSING} more" if len(missing) > NAMED_MISSING else ""
    return (f"  MISSING: {len(missing)} expected visit(s) with no series ({names}{more}): status=missing rows in "
            "volumes.tsv / response.tsv and check.tsv")
