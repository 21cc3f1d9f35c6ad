"""The response tables as HTML, readable inside the Snakemake report.

Snakemake's report shows HTML items in place but offers TSV files only as
downloads, so the tables a trial team reads first are rendered here from the
written TSVs (strings in, strings out: nothing is recomputed or re-rounded):

* :func:`response_page`: ``response.tsv``: participants per category and
  follow-up month, then one row per follow-up with its volumes, change and flags.
* :func:`by_arm_page`: ``response_by_arm.tsv``: per month (primary first)
  the response endpoints per arm with their comparison, then the category
  counts per arm; the notes (allocation mismatches) said once above.
* :func:`categories_summary` / :func:`by_arm_summary`: small fragments the
  report's front page includes (``workflow/report/workflow.rst``).
"""

from __future__ import annotations

from html import escape

from khe_vol.arms import METHOD_DIFFERENCE, METHOD_FISHER, METHOD_ODDS_RATIO
from khe_vol.report.figures import category_counts as figure_counts

NA = "n/a"
_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1.2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #bbb; padding: 3px 7px; text-align: right; vertical-align: top; }
td { white-space: nowrap; } td.wrap { white-space: normal; min-width: 28em; }
th { background: #eee; } td.text, th.text { text-align: left; }
tr.flag td { background: #fff4d6; } p.note { max-width: 70em; }
"""


def _cell(value, text=False):
    if text:
        return f"<td class=\"text{' wrap' if len(value) > 40 else ''}\">{escape(value)}</td>"
    return f"<td>{escape(value)}</td>"


def _table(header, rows, text_columns=(), row_classes=None):
    """An HTML table of strings; ``text_columns`` are left-aligned."""
    head = "".join(f"<th class=\"text\">{escape(h)}</th>" if h in text_columns else f"<th>{escape(h)}</th>"
                   for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f" class=\"{row_classes[i]}\"" if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(_cell(v, h in text_columns) for h, v in zip(header, row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title, source, body):
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1><p>From <code>{escape(source)}</code>; n/a = no value.</p>"
        f"{body}</body></html>\n"
    )


def category_counts(response_rows):
    """Participants per category and follow-up month, as the category-counts figure counts them.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings).

    Returns
    -------
    header : list of str
        ``month``, each category, ``not_assessed``, ``participants``.
    rows : list of list of str
        One per follow-up month, ascending.

    Notes
    -----
    Counting is :func:`khe_vol.report.figures.category_counts` (itself
    :func:`khe_vol.arms.categories_by_month`): every participant counts at every
    month, ``not_assessed`` without a usable category there.
    """
    months, groups = figure_counts(response_rows)
    if not groups:
        return ["month"], []
    (_, counts), = groups
    names = list(counts)
    rows = [[str(m), *(str(counts[c][i]) for c in names), str(sum(counts[c][i] for c in names))]
            for i, m in enumerate(months)]
    return ["month", *names, "participants"], rows


_RESPONSE_SHOWN = (
    "participant_id", "session_id", "month", "baseline_volume_ml", "volume_ml", "percent_change",
    "percent_change_low", "percent_change_high", "category", "near_threshold", "needs_review", "review_reason",
    "status", "message",
)
_RESPONSE_TEXT = {"participant_id", "session_id", "category", "review_reason", "status", "message"}


def response_page(response_rows, source="response.tsv"):
    """``response.tsv`` as a page: category counts per month, then every follow-up.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings, as written).
    source : str
        The table's path, named on the page.

    Returns
    -------
    str
        A self-contained HTML page. Rows needing a reader's look
        (``needs_review=1``, ``near_threshold=1`` or ``status=error``) are shaded.
    """
    header, counts = category_counts(response_rows)
    shown = [c for c in _RESPONSE_SHOWN if any(c in r for r in response_rows)] or list(_RESPONSE_SHOWN)
    rows = [[r.get(c, NA) for c in shown] for r in response_rows]
    flagged = ["flag" if r.get("needs_review") == "1" or r.get("near_threshold") == "1" or r.get("status") != "ok"
               else "" for r in response_rows]
    body = (
        "<h2>Participants per response category and month</h2>"
        + _table(header, counts, {"month"})
        + "<h2>Every follow-up</h2><p class=\"note\">Shaded: a category that could flip within the volume bands "
        "(near_threshold), a series flagged for review (needs_review, see review_reason) or no category (status=error, "
        "see message). Volumes in mL, changes in % of the baseline volume.</p>"
        + _table(shown, rows, _RESPONSE_TEXT, flagged)
    )
    return _page("Response category of every follow-up", source, body)


def categories_summary(response_rows):
    """A small table for the report's front page: participants per category (rows) and month (columns)."""
    header, counts = category_counts(response_rows)
    if not counts:
        return "<p>No follow-up series.</p>\n"
    months = [row[0] for row in counts]
    names = header[1:]
    rows = [[name, *(row[1 + i] for row in counts)] for i, name in enumerate(names)]
    return _table(["category \\ month", *months], rows, {"category \\ month"}) + "\n"


def _arm_value(row, i):
    n, hits, rate = row[f"n_{i}"], row[f"responders_{i}"], row[f"rate_{i}_pct"]
    return f"{hits}/{n} ({rate} %)" if rate != NA else f"{hits}/{n}"


def _interval(value, low, high):
    return value if value == NA else f"{value} [{low}, {high}]"


def _arms(rows):
    arms = []
    for r in rows:
        for key in ("arm_1", "arm_2"):
            if r.get(key, NA) != NA and r[key] not in arms:
                arms.append(r[key])
    return arms


def _by_arm_month_table(rows, compact=False, shared_notes=()):
    """One month's endpoints: responders/n (rate) per arm, then the comparison (two arms).

    ``compact`` leaves the odds ratio and the notes out (the front page's
    narrow column); otherwise a last column holds each row's notes except
    ``shared_notes`` (said once above the tables).
    """
    arms = _arms(rows)
    two = all(r.get("arm_2", NA) != NA for r in rows)
    header = ["endpoint", *arms]
    if two:
        header += (["difference, % points [95% CI]", "Fisher p"] if compact
                   else ["difference, % points [95% CI]", "odds ratio [95% CI]", "Fisher p"])
    if not compact:
        header.append("note")
    by_endpoint = {}
    for r in rows:  # with another number of arms than two, one row per endpoint and arm
        by_endpoint.setdefault(r["endpoint"], {})[r["arm_1"]] = r
    table = []
    for endpoint, per_arm in by_endpoint.items():
        first = next(iter(per_arm.values()))
        if two:
            cells = [_arm_value(first, 1), _arm_value(first, 2),
                     _interval(first["difference_pct"], first["difference_ci_low_pct"], first["difference_ci_high_pct"]),
                     *([] if compact else [_interval(first["odds_ratio"], first["odds_ratio_ci_low"], first["odds_ratio_ci_high"])]),
                     first["fisher_p"]]
        else:
            cells = [_arm_value(per_arm[a], 1) if a in per_arm else NA for a in arms]
        if not compact:
            own = [n for r in per_arm.values() for n in _notes([r]) if n not in shared_notes]
            cells.append("; ".join(dict.fromkeys(own)) or "")
        table.append([endpoint.removeprefix("category:"), *cells])
    return header, table


def _notes(rows):
    notes = []
    for r in rows:
        for part in r.get("note", NA).split("; "):
            if part and part != NA and part not in notes:
                notes.append(part)
    return notes


def by_arm_page(arm_rows, source="response_by_arm.tsv"):
    """``response_by_arm.tsv`` as a page: per month, endpoints per arm and their comparison.

    Parameters
    ----------
    arm_rows : list of dict
        ``response_by_arm.tsv`` rows (strings, as written; primary month first).
    source : str
        The table's path, named on the page.

    Returns
    -------
    str
        A self-contained HTML page.
    """
    months = list(dict.fromkeys(r["month"] for r in arm_rows))
    # Notes on every row (the allocation's mismatches) are said once, above the tables.
    shared = [n for n in _notes(arm_rows) if all(n in _notes([r]) for r in arm_rows)]
    parts = []
    if shared:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in shared) + "</ul>")
    for month in months:
        rows = [r for r in arm_rows if r["month"] == month]
        primary = " (primary endpoint)" if rows[0].get("primary") == "1" else ""
        header, table = _by_arm_month_table(rows, shared_notes=shared)
        parts.append(f"<h2>Month {escape(month)}{primary}</h2>" + _table(header, table, {"endpoint", "note"}))
    # The methods are the data dictionary's (response_by_arm.json), said once here.
    methods = [f"difference and its 95% CI: {METHOD_DIFFERENCE}", f"odds ratio and its 95% CI: {METHOD_ODDS_RATIO}",
               f"p: {METHOD_FISHER}"]
    parts.append("<h2>Methods</h2><p class=\"note\">Responders/n (rate) per arm; every allocated participant counts "
                 "(intention to treat), one without a usable category is a non-responder (not_assessed). "
                 + "</p><ul>" + "".join(f"<li>{escape(m)}</li>" for m in methods) + "</ul>")
    return _page("Response by randomised arm", source, "".join(parts))


def by_arm_summary(arm_rows):
    """A small table for the report's front page: the response endpoints at the primary month."""
    rows = [r for r in arm_rows if r.get("primary") == "1" and not r["endpoint"].startswith("category:")]
    if not rows:
        return "<p>No primary-month rows.</p>\n"
    header, table = _by_arm_month_table(rows, compact=True)
    return (f"<p>Month {escape(rows[0]['month'])} (primary endpoint):</p>" + _table(header, table, {"endpoint"})
            + "".join(f"<p>{escape(n)}</p>" for n in _notes(rows) if "imaged" in n) + "\n")
