"""Figures for the Snakemake HTML report: waterfall, volume trajectories, category counts.

Inputs are table rows as :mod:`khe_vol.tables` writes them (dicts of
strings, ``n/a`` = missing), optionally the allocation
``{participant_id: arm}`` (:func:`khe_vol.arms.read_allocation`) and the arm
order. Each figure has two entry points: ``*_figure`` builds a
:class:`matplotlib.figure.Figure` (the tests count its axes and bars) and
``*_png`` renders it to bytes; write them with
:func:`khe_vol.files.atomic_write_bytes`.

Choices:

* **Colours** are the Okabe-Ito palette (safe for the common colour-vision
  deficiencies) in a fixed category -> colour map, the same in every figure
  and every run; growth is vermillion, involution runs from light to dark
  blue to bluish green, no change is grey.
* **Not assessed is never drawn as a value.** A participant without a usable
  category at a month is counted in a note (waterfall) or as a hatched
  ``not assessed`` segment (category counts), never as a 0 % bar.
* **Reproducible bytes.** Figures are built on :class:`Figure` without
  pyplot (no global state, no GUI backend), in matplotlib's bundled DejaVu
  Sans, at a fixed size and dpi; PNGs carry no ``Software`` text and SVGs no
  date and a fixed ``svg.hashsalt``, so a rerun gives the same bytes on the
  same matplotlib version.
* **Never raises on missing values**: unparsable numbers, error rows and
  unknown months are skipped (and counted as not assessed where a count is
  shown); no rows at all gives a figure that says "no data".
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from khe_vol.arms import NOT_ASSESSED, categories_by_month
from khe_vol.files import tsv_number
from khe_vol.response import (
    CATEGORIES,
    COMPLETE,
    GROWTH,
    NEARLY_COMPLETE,
    NO_CHANGE,
    PARTIAL,
)

#: Category -> colour (Okabe-Ito, colour-blind safe); fixed across figures.
CATEGORY_COLORS = {
    GROWTH: "#D55E00",  # vermillion
    NO_CHANGE: "#999999",  # grey: neither better nor worse
    PARTIAL: "#56B4E9",  # sky blue
    NEARLY_COMPLETE: "#0072B2",  # blue
    COMPLETE: "#009E73",  # bluish green
    NOT_ASSESSED: "#FFFFFF",  # white, hatched grey: an absence, not a result
}
CATEGORY_LABELS = {
    GROWTH: "growth (>= +20%)",
    NO_CHANGE: "no change",
    PARTIAL: "partial involution (<= -20%)",
    NEARLY_COMPLETE: "nearly complete involution (<= -75%)",
    COMPLETE: "complete involution (-100%)",
    NOT_ASSESSED: "not assessed",
}

#: Category thresholds drawn on the waterfall: (percent, label).
THRESHOLDS = ((20, "+20%\ngrowth"), (-20, "-20%\npartial"), (-75, "-75%\nnearly\ncomplete"))
#: Bars above this percent change are cut here and labelled with their value, so
#: one large growth does not flatten every involution bar.
WATERFALL_CAP = 100.0
#: Participant ids are written under the bars only up to this many bars in a panel.
MAX_LABELLED_BARS = 40
#: Hatch of near-threshold bars and of not-assessed segments.
NEAR_HATCH = "///"
NOT_ASSESSED_HATCH = "xx"

DPI = 100
_STYLE = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: same glyphs on every machine
    "font.size": 9,
    "svg.hashsalt": "khe-vol",  # SVG ids otherwise come from a random salt
    "svg.fonttype": "path",
    "hatch.linewidth": 0.8,
    "path.simplify": True,
}


@contextmanager
def _style():
    with matplotlib.rc_context(_STYLE):
        yield


# ---------------------------------------------------------------- parsing


def _month(text):
    """A whole month from a table cell, or ``None``."""
    value = tsv_number(text)
    return int(value) if value is not None and value == int(value) else None


def _arm_order(allocation, arms):
    """Arms in report order: configured order, then any other allocated arm, sorted."""
    order = list(dict.fromkeys(arms or ()))
    return order + sorted(set(allocation.values()) - set(order))


def _groups(participants, allocation, arms):
    """``[(title, [participant_id, ...])]``: one group per arm, or one for everyone.

    With an allocation every allocated participant belongs to its arm's group
    (intention to treat: with or without rows); participants with rows but no
    arm are left out (the figure's title says how many).
    """
    if allocation is None:
        return [(None, sorted(participants))]
    return [(arm, sorted(p for p, a in allocation.items() if a == arm)) for arm in _arm_order(allocation, arms)]


def _unallocated(participants, allocation):
    return sorted(set(participants) - set(allocation or {})) if allocation is not None else []


# ---------------------------------------------------------------- rendering


def figure_bytes(fig, fmt="png"):
    """Render a figure to reproducible bytes.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
    fmt : {"png", "svg"}

    Returns
    -------
    bytes
        PNG without the ``Software`` text chunk, or SVG without a date, with
        the fixed ``svg.hashsalt`` of this module.
    """
    metadata = {"png": {"Software": None}, "svg": {"Date": None}}[fmt]
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


def _new_figure(width, height):
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _no_data(ax, text="no data"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _no_data_figure(title):
    fig = _new_figure(6, 3)
    ax = fig.add_subplot()
    ax.set_title(title)
    _no_data(ax)
    return fig


def _category_handles(with_not_assessed=False):
    cats = (*CATEGORIES, NOT_ASSESSED) if with_not_assessed else CATEGORIES
    return [
        Patch(
            facecolor=CATEGORY_COLORS[c], edgecolor="#555555", linewidth=0.5,
            hatch=NOT_ASSESSED_HATCH if c == NOT_ASSESSED else None, label=CATEGORY_LABELS[c],
        )
        for c in cats
    ]


def _short_list(ids, limit=8):
    return ", ".join(ids) if len(ids) <= limit else f"{', '.join(ids[:limit])}, ..."


# ---------------------------------------------------------------- waterfall


def waterfall_points(response_rows, month):
    """Usable percent changes at one month.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings).
    month : int
        Follow-up month (months after baseline).

    Returns
    -------
    dict
        ``{participant_id: (percent_change, category, near_threshold)}`` for
        rows at ``month`` with ``status=ok``, a known category and a finite
        percent change; ``near_threshold`` is a bool (``n/a`` = False).
    """
    points = {}
    for row in response_rows:
        if _month(row.get("month")) != month or row.get("status") != "ok":
            continue
        change, category = tsv_number(row.get("percent_change")), row.get("category")
        if change is None or category not in CATEGORIES:
            continue
        points[row["participant_id"]] = (change, category, row.get("near_threshold") == "1")
    return points


def _waterfall_panel(ax, points, participants, title, month):
    """Bars of one group, sorted by percent change, largest growth first."""
    shown = sorted((p for p in participants if p in points), key=lambda p: (-points[p][0], p))
    missing = [p for p in participants if p not in points]
    heights = [min(points[p][0], WATERFALL_CAP) for p in shown]
    bars = ax.bar(
        range(len(shown)), heights, width=0.8,
        color=[CATEGORY_COLORS[points[p][1]] for p in shown], edgecolor="#333333", linewidth=0.4,
    )
    for bar, pid in zip(bars, shown):
        bar.set_gid(pid)
        if points[pid][2]:
            bar.set_hatch(NEAR_HATCH)
        if points[pid][0] > WATERFALL_CAP:
            # The bar is cut at the cap: say how far it really goes (inside the bar,
            # where no note or title can cover it).
            ax.text(bar.get_x() + bar.get_width() / 2, WATERFALL_CAP - 3, f"+{points[pid][0]:.0f}%",
                    ha="center", va="top", fontsize=6.5, rotation=90, color="white")
    ax.axhline(0, color="black", linewidth=0.6)
    for value, _ in THRESHOLDS:
        ax.axhline(value, color="#444444", linewidth=0.7, linestyle="--")
    if len(shown) <= MAX_LABELLED_BARS:
        ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.7, max(len(shown), 1) - 0.3)
    label = f"participants with a category at month {month} (n={len(shown)})"
    if missing:
        # Below the axis, never as a bar: no value is not a 0 % change.
        label += f"\n{len(missing)} not assessed: {_short_list(missing)}"
    ax.set_xlabel(label)
    head = f"{title} (n={len(participants)})" if title is not None else f"all participants (n={len(participants)})"
    ax.set_title(head)
    if not shown:
        _no_data(ax, "no participant with a category at this month")
    return bars


def waterfall_figure(response_rows, month, allocation=None, arms=None):
    """Waterfall plot of percent volume change at one month, one panel per arm.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings, ``n/a`` = missing).
    month : int
        Follow-up month to show (the primary endpoint month).
    allocation : dict, optional
        ``{participant_id: arm}``; one panel per arm, every allocated
        participant counted (those without a usable category are listed as
        not assessed). Without it, one panel of every participant in
        ``response_rows``.
    arms : sequence of str, optional
        Panel order (experimental arm first); arms only in ``allocation``
        follow, sorted.

    Returns
    -------
    matplotlib.figure.Figure
        Bars (percent change, %, cut at :data:`WATERFALL_CAP`) sorted
        descending, coloured by category, hatched when ``near_threshold=1``;
        each bar's gid is its participant id.
    """
    month = int(month)
    allocation = allocation or None
    participants = {row["participant_id"] for row in response_rows if row.get("participant_id")}
    if not participants and not allocation:
        return _no_data_figure(f"Percent change of lesion volume at month {month}")
    points = waterfall_points(response_rows, month)
    groups = _groups(participants, allocation, arms)
    fig = _new_figure(min(4.0 + 5.0 * len(groups), 16.0), 5.2)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (title, members) in zip(axes, groups):
        _waterfall_panel(ax, points, members, title, month)
    low = min([-100.0] + [p[0] for p in points.values()])
    high = min(max([25.0] + [p[0] for p in points.values()]), WATERFALL_CAP)
    axes[0].set_ylim(low - 8, high + (18 if high >= WATERFALL_CAP else 8))
    axes[0].set_ylabel("change of lesion volume vs baseline (%)")
    for value, label in THRESHOLDS:
        # Labelled once, right of the last panel, where no bar can hide them.
        axes[-1].annotate(label, (1, value), xycoords=("axes fraction", "data"), xytext=(3, 0),
                          textcoords="offset points", ha="left", va="center", fontsize=7, color="#444444")
    title = f"Percent change of lesion volume at month {month}"
    unallocated = _unallocated(participants, allocation)
    if unallocated:
        title += f" ({len(unallocated)} with imaging but not allocated: not shown)"
    fig.suptitle(title)
    handles = _category_handles() + [
        Patch(facecolor="white", edgecolor="#333333", hatch=NEAR_HATCH,
              label="hatched: near a threshold (category could flip within the volume bands)")
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=7.5, frameon=False)
    return fig


def waterfall_png(response_rows, month, allocation=None, arms=None):
    """PNG bytes of :func:`waterfall_figure` (same parameters)."""
    with _style():
        return figure_bytes(waterfall_figure(response_rows, month, allocation, arms))


# ---------------------------------------------------------------- spaghetti


def trajectories(volume_rows):
    """Measured volumes per participant, in month order.

    Parameters
    ----------
    volume_rows : list of dict
        ``volumes.tsv`` rows (strings).

    Returns
    -------
    dict
        ``{participant_id: [(month, volume_ml, low_ml, high_ml), ...]}`` of
        rows with ``status=ok`` and a numeric month and volume; ``low_ml`` /
        ``high_ml`` are ``None`` when missing.
    """
    out = {}
    for row in volume_rows:
        month, volume = _month(row.get("month")), tsv_number(row.get("volume_ml"))
        if row.get("status") != "ok" or month is None or volume is None:
            continue
        out.setdefault(row["participant_id"], []).append(
            (month, volume, tsv_number(row.get("volume_low_ml")), tsv_number(row.get("volume_high_ml")))
        )
    return {pid: sorted(points) for pid, points in sorted(out.items())}


def linear_threshold(values):
    """Linear range of the symlog axis: the decade of the smallest positive volume.

    Below it the axis is linear, so 0 mL (complete involution) has a place at
    the bottom; above it every decade has the same height, so the same
    relative change (e.g. -75 %) looks the same for a 2 mL and a 200 mL lesion.
    """
    positive = [v for v in values if v is not None and v > 0]
    if not positive:
        return 1.0
    return 10.0 ** math.floor(math.log10(min(positive)))


#: Line colours of the participants of one panel (Okabe-Ito; yellow left out: too light on white).
PARTICIPANT_COLORS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#999999")
#: Markers cycled with the colours (``v`` is kept for 0 mL): 8 x 6 = 48 distinct pairs per panel.
PARTICIPANT_MARKERS = ("o", "s", "^", "D", "P", "X")
#: Font size (pt) of the participant labels at the line ends, and their least vertical gap (pt).
END_LABEL_SIZE = 6.5
END_LABEL_GAP_PT = 7.5


def participant_style(index):
    """``(colour, marker)`` of the ``index``-th participant of a panel.

    Colours change fastest, markers after every full round of colours, so
    the first 48 participants of a panel each get a pair of their own;
    beyond that the end label still tells lines apart.
    """
    return (PARTICIPANT_COLORS[index % len(PARTICIPANT_COLORS)],
            PARTICIPANT_MARKERS[(index // len(PARTICIPANT_COLORS)) % len(PARTICIPANT_MARKERS)])


def spread_positions(positions, gap, low=None, high=None):
    """Move sorted 1D label positions apart by at least ``gap``, as little as possible.

    Parameters
    ----------
    positions : sequence of float
        Wanted positions (any unit, e.g. points), any order.
    gap : float
        Least distance between two neighbours (same unit).
    low, high : float, optional
        Bounds the positions are kept within where there is room.

    Returns
    -------
    list of float
        New positions, in the order of ``positions``; neighbours in
        the same order as before, each at least ``gap`` apart.
    """
    order = sorted(range(len(positions)), key=lambda i: (positions[i], i))
    placed = [float(positions[i]) for i in order]
    if low is not None and placed:
        placed[0] = max(placed[0], low)
    for k in range(1, len(placed)):  # push up
        placed[k] = max(placed[k], placed[k - 1] + gap)
    if high is not None and placed and placed[-1] > high:
        placed[-1] = max(high, placed[0] if len(placed) == 1 else high)
        for k in range(len(placed) - 2, -1, -1):  # push back down from the top
            placed[k] = min(placed[k], placed[k + 1] - gap)
    out = [0.0] * len(placed)
    for k, i in enumerate(order):
        out[i] = placed[k]
    return out


def _label_line_ends(fig, ax, ends):
    """Write each participant's label right of its last point, moved apart so none overlap.

    ``ends`` is ``[(participant_id, month, volume_ml, colour)]``. The figure is
    laid out once first, so the gap is exact in points on the page.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # final layout: data -> display is known
    to_points = 72.0 / fig.dpi
    bottom, top = (v * to_points for v in ax.get_window_extent().intervaly)
    by_month = {}
    for end in ends:
        by_month.setdefault(end[1], []).append(end)
    for month, group in sorted(by_month.items()):
        wanted = [ax.transData.transform((month, volume))[1] * to_points for _, _, volume, _ in group]
        placed = spread_positions(wanted, END_LABEL_GAP_PT, bottom + 3, top - 3)
        for (pid, _, volume, color), y0, y in zip(group, wanted, placed):
            text = ax.annotate(
                pid.removeprefix("sub-"), (month, volume), xytext=(6, y - y0), textcoords="offset points",
                ha="left", va="center", fontsize=END_LABEL_SIZE, color=color, annotation_clip=False,
                arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.4, "shrinkA": 0, "shrinkB": 2}
                if abs(y - y0) > 1 else None,
            )
            text.set_gid(f"label:{pid}")
            text.set_in_layout(False)


def spaghetti_figure(volume_rows, allocation=None, arms=None):
    """Lesion volume over time, one labelled line per participant, one panel per arm.

    The volume axis is symmetric-log (see :func:`linear_threshold`): lesion
    volumes span decades and response is a relative change, which a log axis
    shows at equal heights; 0 mL cannot sit on a log axis, so the lowest
    decade is linear and 0 mL points get an extra marker.

    So one line can be followed among ~50: each arm has its own panel (the
    arm is the panel, not the colour); within a panel each participant has a
    colour and marker of its own (:func:`participant_style`, 48 distinct
    pairs) and its id (without ``sub-``) is written at its last point, labels
    moved apart (:func:`spread_positions`) with a thin leader line when
    moved. The figure grows taller with the largest panel so the labels fit.

    Parameters
    ----------
    volume_rows : list of dict
        ``volumes.tsv`` rows (strings); error rows and missing volumes skipped.
    allocation : dict, optional
        ``{participant_id: arm}``: one panel per arm; participants with
        volumes but no arm in a last panel, ``not allocated``.
    arms : sequence of str, optional
        Panel order.

    Returns
    -------
    matplotlib.figure.Figure
        One Line2D per participant (gid = participant id) with vertical
        error bars from ``volume_low_ml`` to ``volume_high_ml``, and one
        annotation per participant (gid ``label:<participant id>``).
    """
    title = "Lesion volume over time"
    series = trajectories(volume_rows)
    if not series:
        return _no_data_figure(title)
    if allocation:
        groups = [(arm, [p for p in members if p in series]) for arm, members in _groups(series, allocation, arms)]
        other = [p for p in series if p not in allocation]
        if other:
            groups.append(("not allocated", other))
    else:
        groups = [(None, sorted(series))]
    largest = max(len(members) for _, members in groups)
    fig = _new_figure(min(2.5 + 5.0 * len(groups), 16.0), max(5.2, 2.6 + largest * END_LABEL_GAP_PT / 72.0))
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    values = [v for pts in series.values() for p in pts for v in (p[1], p[2])]
    threshold = linear_threshold(values)
    all_months = sorted({p[0] for pts in series.values() for p in pts})
    zero_style = {"marker": "v", "markersize": 7, "markerfacecolor": "white", "linestyle": "none", "zorder": 4}
    ends = []
    for ax, (name, members) in zip(axes, groups):
        panel_ends = []
        for index, pid in enumerate(members):
            points = series[pid]
            color, marker = participant_style(index)
            months = [p[0] for p in points]
            volumes = [p[1] for p in points]
            # Error bars: the band around each volume; a missing limit = no bar that way.
            below = [p[1] - p[2] if p[2] is not None else 0.0 for p in points]
            above = [p[3] - p[1] if p[3] is not None else 0.0 for p in points]
            container = ax.errorbar(
                months, volumes, yerr=[[max(b, 0.0) for b in below], [max(a, 0.0) for a in above]],
                color=color, marker=marker, markersize=3.5, linewidth=1.0, elinewidth=0.7, capsize=2, alpha=0.9,
            )
            container.lines[0].set_gid(pid)
            zeros = [m for m, v in zip(months, volumes) if v == 0]
            if zeros:
                ax.plot(zeros, [0.0] * len(zeros), markeredgecolor=color, **zero_style)
            panel_ends.append((pid, months[-1], volumes[-1], color))
        ends.append(panel_ends)
        ax.set_yscale("symlog", linthresh=threshold, linscale=0.5)
        ax.set_xticks(all_months)
        # Room right of the last month for the labels.
        span = max(all_months[-1] - all_months[0], 1)
        ax.set_xlim(all_months[0] - 0.05 * span, all_months[-1] + 0.22 * span)
        ax.set_xlabel("months after baseline")
        ax.grid(True, which="major", axis="y", color="#DDDDDD", linewidth=0.6)
        head = name if name is not None else "all participants"
        ax.set_title(f"{head} (n={len(members)} with a volume)")
        if not members:
            _no_data(ax, "no participant with a volume")
    axes[0].set_ylim(bottom=-threshold * 0.15)
    # Plain mL (0.1, 1, 10, 100) rather than powers of ten: read by clinicians.
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes[0].set_ylabel(f"lesion volume (mL; log scale, linear below {threshold:g} mL)")
    fig.suptitle(title)
    handles = [
        Line2D([], [], color="#333333", marker="v", markerfacecolor="white", linestyle="none",
               label="0 mL: complete involution"),
        Line2D([], [], color="#333333", marker="|", linestyle="none", markersize=10,
               label="bar: volume uncertainty band (low - high)"),
        Line2D([], [], color="#333333", marker="o", label="label at a line's last point: participant id (no sub-)"),
    ]
    fig.legend(handles=handles, fontsize=7.5, loc="outside lower center", ncol=3, frameon=False)
    with _style():
        for ax, panel_ends in zip(axes, ends):
            _label_line_ends(fig, ax, panel_ends)
    return fig


def spaghetti_png(volume_rows, allocation=None, arms=None):
    """PNG bytes of :func:`spaghetti_figure` (same parameters)."""
    with _style():
        return figure_bytes(spaghetti_figure(volume_rows, allocation, arms))


# ---------------------------------------------------------------- category counts


def _clean_rows(response_rows):
    """Rows with a whole month (others carry no month to count them at)."""
    return [dict(row, month=str(_month(row.get("month")))) for row in response_rows
            if row.get("participant_id") and _month(row.get("month")) is not None]


def category_counts(response_rows, allocation=None, arms=None):
    """Participants per category, per arm and follow-up month.

    Counting is :func:`khe_vol.arms.categories_by_month`, as in
    ``response_by_arm.tsv``: every participant of a group counts at every
    month, without a usable category as ``not_assessed``.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings).
    allocation : dict, optional
        ``{participant_id: arm}``; without it one group of every participant
        in ``response_rows``.
    arms : sequence of str, optional
        Group order.

    Returns
    -------
    months : list of int
        Follow-up months with any row, ascending (0 dropped).
    counts : list of (str or None, dict)
        Per group (arm name or ``None``): ``{category: [count per month]}``
        for every category of :data:`khe_vol.arms.ARM_CATEGORIES`.
    """
    rows = _clean_rows(response_rows)
    months = sorted({int(r["month"]) for r in rows} - {0})
    participants = {r["participant_id"] for r in rows}
    out = []
    for title, members in _groups(participants, allocation, arms):
        by_month = categories_by_month(rows, members, months)
        out.append((title, {
            cat: [sum(1 for c in by_month[m].values() if c == cat) for m in months]
            for cat in (*CATEGORIES, NOT_ASSESSED)
        }))
    return months, out


def category_counts_figure(response_rows, allocation=None, arms=None, primary_month=None):
    """Stacked bars: participants per response category at each follow-up month.

    Parameters
    ----------
    response_rows : list of dict
        ``response.tsv`` rows (strings).
    allocation : dict, optional
        ``{participant_id: arm}``: one panel per arm (intention to treat).
    arms : sequence of str, optional
        Panel order.
    primary_month : int, optional
        Marked "(primary)" under its bar.

    Returns
    -------
    matplotlib.figure.Figure
        Per panel one BarContainer per category (bottom: complete involution;
        top: not assessed, hatched), each segment labelled with its count.
    """
    title = "Response category per follow-up month"
    allocation = allocation or None
    months, counts = category_counts(response_rows, allocation, arms)
    if not months or not counts:
        return _no_data_figure(title)
    fig = _new_figure(min(3.0 + 4.0 * len(counts), 16.0), 4.8)
    axes = fig.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    # Best response at the bottom, where stacked bars are easiest to compare.
    stack = (COMPLETE, NEARLY_COMPLETE, PARTIAL, NO_CHANGE, GROWTH, NOT_ASSESSED)
    labels = [f"{m}\n(primary)" if m == primary_month else str(m) for m in months]
    for ax, (arm, per_cat) in zip(axes, counts):
        bottom = [0] * len(months)
        for cat in stack:
            bars = ax.bar(
                range(len(months)), per_cat[cat], bottom=bottom, width=0.65, label=CATEGORY_LABELS[cat],
                color=CATEGORY_COLORS[cat], edgecolor="#555555", linewidth=0.5,
                hatch=NOT_ASSESSED_HATCH if cat == NOT_ASSESSED else None,
            )
            for bar in bars:
                bar.set_gid(cat)
            ax.bar_label(bars, labels=[str(c) if c else "" for c in per_cat[cat]], label_type="center", fontsize=7,
                         color="white" if cat in (NEARLY_COMPLETE, COMPLETE, GROWTH) else "black")
            bottom = [b + c for b, c in zip(bottom, per_cat[cat])]
        n = bottom[0] if bottom else 0
        ax.set_title(f"{arm} (n={n})" if arm is not None else f"all participants (n={n})")
        ax.set_xticks(range(len(months)), labels)
        ax.set_xlabel("months after baseline")
    axes[0].set_ylabel("participants")
    unallocated = _unallocated({r.get("participant_id") for r in response_rows} - {None, ""}, allocation)
    if unallocated:
        title += f" ({len(unallocated)} with imaging but not allocated: not counted)"
    fig.suptitle(title)
    fig.legend(handles=_category_handles(with_not_assessed=True), loc="outside lower center", ncol=3,
               fontsize=7.5, frameon=False)
    return fig


def category_counts_png(response_rows, allocation=None, arms=None, primary_month=None):
    """PNG bytes of :func:`category_counts_figure` (same parameters)."""
    with _style():
        return figure_bytes(category_counts_figure(response_rows, allocation, arms, primary_month))
