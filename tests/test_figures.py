"""Report figures: real PNG bytes, reproducible, and the drawn values checked."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.colors import to_rgba

from khe_vol.report.figures import (
    CATEGORY_COLORS,
    DPI,
    NEAR_HATCH,
    WATERFALL_CAP,
    category_counts,
    category_counts_figure,
    category_counts_png,
    figure_bytes,
    linear_threshold,
    spaghetti_figure,
    spaghetti_png,
    spread_positions,
    waterfall_figure,
    waterfall_png,
)
from khe_vol.response import COMPLETE, GROWTH, NEARLY_COMPLETE, NO_CHANGE, PARTIAL

NA = "n/a"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def response_row(pid, month, change, category, near="0", status="ok"):
    """A response.tsv row as strings (only the columns the figures read, plus noise)."""
    ok = status == "ok"
    return {
        "participant_id": pid,
        "session_id": f"ses-m{month:02d}",
        "month": str(month),
        "percent_change": f"{change:.3f}" if ok else NA,
        "category": category if ok else NA,
        "near_threshold": near if ok else NA,
        "status": status,
        "message": NA if ok else "follow-up not measured: truncated file",
    }


def volume_row(pid, month, volume, low=None, high=None, status="ok"):
    ok = status == "ok"
    def fmt(value):
        return NA if value is None or not ok else f"{value:.6f}"

    return {
        "participant_id": pid, "session_id": f"ses-m{month:02d}", "month": str(month),
        "volume_ml": fmt(volume), "volume_low_ml": fmt(low), "volume_high_ml": fmt(high), "status": status,
    }


# Month 12: five categories, one near threshold, one error, one growth beyond the cap.
ROWS_12 = [
    response_row("sub-01", 12, 35.0, GROWTH),
    response_row("sub-02", 12, -10.0, NO_CHANGE),
    response_row("sub-03", 12, -22.5, PARTIAL, near="1"),
    response_row("sub-04", 12, -80.0, NEARLY_COMPLETE),
    response_row("sub-05", 12, -100.0, COMPLETE),
    response_row("sub-06", 12, 0.0, NA, status="error"),
    response_row("sub-07", 12, 250.0, GROWTH),
]
ROWS = ROWS_12 + [
    response_row("sub-01", 6, 5.0, NO_CHANGE),
    response_row("sub-02", 6, -30.0, PARTIAL),
    response_row("sub-05", 6, -90.0, NEARLY_COMPLETE),
]
ALLOCATION = {"sub-01": "A", "sub-02": "B", "sub-03": "A", "sub-04": "B", "sub-05": "A", "sub-06": "B",
              "sub-07": "B", "sub-08": "A"}  # sub-08: allocated, no imaging at all
ARMS = ["A", "B"]


def decode(payload):
    """Decoded PNG pixels (rows, columns, channels)."""
    assert payload.startswith(PNG_MAGIC)
    return mpimg.imread(io.BytesIO(payload), format="png")


def expected_shape(fig):
    width, height = fig.get_size_inches() * DPI
    return round(height), round(width)


def bars_of(ax):
    """The waterfall's bars (the first BarContainer of the axes)."""
    return list(ax.containers[0])


def rgba(bar):
    return tuple(np.round(bar.get_facecolor(), 4))


def color_of(category):
    return tuple(np.round(to_rgba(CATEGORY_COLORS[category]), 4))


# ---------------------------------------------------------------- waterfall


def test_waterfall_png_decodes_at_figure_size_and_is_reproducible():
    payload = waterfall_png(ROWS, 12)
    assert decode(payload).shape[:2] == expected_shape(waterfall_figure(ROWS, 12))
    assert waterfall_png(ROWS, 12) == payload
    assert b"Software" not in payload and b"matplotlib" not in payload.lower()


def test_waterfall_bars_are_sorted_percent_changes_in_category_colours():
    fig = waterfall_figure(ROWS, 12)
    (ax,) = fig.axes
    bars = bars_of(ax)
    # sub-06 (error) is not a bar; sub-07 is cut at the cap.
    assert [b.get_gid() for b in bars] == ["sub-07", "sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]
    assert [b.get_height() for b in bars] == pytest.approx([WATERFALL_CAP, 35.0, -10.0, -22.5, -80.0, -100.0])
    assert [rgba(b) for b in bars] == [color_of(c) for c in (GROWTH, GROWTH, NO_CHANGE, PARTIAL, NEARLY_COMPLETE, COMPLETE)]
    assert [b.get_hatch() for b in bars] == [None, None, None, NEAR_HATCH, None, None]
    texts = [t.get_text() for t in ax.texts]
    assert "+250%" in texts  # the cut bar says how far it goes
    assert "1 not assessed: sub-06" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == [b.get_gid() for b in bars]
    # Threshold lines at +20, -20, -75 (and the 0 line).
    levels = sorted(line.get_ydata()[0] for line in ax.get_lines())
    assert levels == [-75, -20, 0, 20]
    # Legend: five categories and the hatch explanation.
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 6 and "hatched" in labels[-1]


def test_waterfall_with_allocation_has_one_panel_per_arm_and_counts_unassessed():
    fig = waterfall_figure(ROWS, 12, ALLOCATION, ARMS)
    assert len(fig.axes) == 2
    arm_a, arm_b = fig.axes
    assert arm_a.get_title() == "A (n=4)" and arm_b.get_title() == "B (n=4)"
    assert [b.get_gid() for b in bars_of(arm_a)] == ["sub-01", "sub-03", "sub-05"]
    assert [b.get_gid() for b in bars_of(arm_b)] == ["sub-07", "sub-02", "sub-04"]
    assert [b.get_height() for b in bars_of(arm_a)] == pytest.approx([35.0, -22.5, -100.0])
    # Never drawn as 0: listed under the axis.
    assert "1 not assessed: sub-08" in arm_a.get_xlabel()
    assert "1 not assessed: sub-06" in arm_b.get_xlabel()
    assert decode(waterfall_png(ROWS, 12, ALLOCATION, ARMS)).shape[:2] == expected_shape(fig)


def test_waterfall_hides_ids_beyond_40_bars():
    rows = [response_row(f"sub-{i:03d}", 12, -i, NO_CHANGE if i < 20 else PARTIAL) for i in range(41)]
    (ax,) = waterfall_figure(rows, 12).axes
    assert len(bars_of(ax)) == 41
    assert ax.get_xticklabels() == []


def test_waterfall_ignores_junk_values():
    rows = [
        {"participant_id": "sub-01", "month": "n/a", "percent_change": "10", "category": NO_CHANGE, "status": "ok"},
        {"participant_id": "sub-02", "month": "12", "percent_change": "nan", "category": NO_CHANGE, "status": "ok"},
        {"participant_id": "sub-03", "month": "12", "percent_change": "-50", "category": "n/a", "status": "ok"},
        {"participant_id": "sub-04", "month": "12", "percent_change": "-50.0", "category": PARTIAL, "status": "ok"},
    ]
    (ax,) = waterfall_figure(rows, 12).axes
    assert [b.get_gid() for b in bars_of(ax)] == ["sub-04"]
    assert "3 not assessed" in ax.get_xlabel()


# ---------------------------------------------------------------- spaghetti


VOLUMES = [
    volume_row("sub-01", 0, 40.0, 36.0, 44.0),
    volume_row("sub-01", 6, 20.0, 18.0, 23.0),
    volume_row("sub-01", 12, 0.0, 0.0, 0.4),
    volume_row("sub-02", 0, 3.5, 3.0, 4.0),
    volume_row("sub-02", 6, None, status="error"),
    volume_row("sub-02", 12, 5.0),  # no band: no error bar either way
    volume_row("sub-03", 0, 120.0, 110.0, 130.0),
]


def test_spaghetti_one_panel_per_arm_a_style_and_label_per_participant_with_band_and_zero():
    fig = spaghetti_figure(VOLUMES, {"sub-01": "A", "sub-02": "B", "sub-03": "A"}, ARMS)
    ax_a, ax_b = fig.axes
    assert (ax_a.get_title(), ax_b.get_title()) == ("A (n=2 with a volume)", "B (n=1 with a volume)")
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}
    assert sorted(lines) == ["sub-01", "sub-02", "sub-03"]
    assert {line.get_gid() for line in ax_a.get_lines() if line.get_gid()} == {"sub-01", "sub-03"}
    assert list(lines["sub-01"].get_xdata()) == [0, 6, 12]
    assert list(lines["sub-01"].get_ydata()) == pytest.approx([40.0, 20.0, 0.0])
    assert list(lines["sub-02"].get_xdata()) == [0, 12]  # the error row is skipped
    # Within an arm every participant has its own colour; each line ends in its label.
    assert lines["sub-01"].get_color() != lines["sub-03"].get_color()
    labels = {t.get_gid(): t for ax in fig.axes for t in ax.texts if (t.get_gid() or "").startswith("label:")}
    assert {k: t.get_text() for k, t in labels.items()} == {"label:sub-01": "01", "label:sub-02": "02",
                                                           "label:sub-03": "03"}
    assert labels["label:sub-01"].xy == (12, 0.0) and labels["label:sub-03"].xy == (0, 120.0)
    assert labels["label:sub-01"].get_color() == lines["sub-01"].get_color()
    assert ax_a.get_yscale() == "symlog"
    # 0 mL is on the axis and has its own marker.
    assert ax_a.get_ylim()[0] < 0
    zero_markers = [line for line in ax_a.get_lines() if line.get_marker() == "v"]
    assert len(zero_markers) == 1 and list(zero_markers[0].get_xdata()) == [12]
    # Error bars: the vertical segments span the band.
    segments = [seg for ax in fig.axes for coll in ax.collections for seg in coll.get_segments()]
    spans = sorted((round(s[0][1], 6), round(s[1][1], 6)) for s in segments)
    assert (36.0, 44.0) in spans and (0.0, 0.4) in spans and (110.0, 130.0) in spans
    payload = spaghetti_png(VOLUMES, {"sub-01": "A", "sub-02": "B", "sub-03": "A"}, ARMS)
    assert decode(payload).shape[:2] == expected_shape(fig)
    assert payload == spaghetti_png(VOLUMES, {"sub-01": "A", "sub-02": "B", "sub-03": "A"}, ARMS)


def test_spaghetti_fifty_participants_keep_distinct_styles_and_labels_that_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rng = np.random.default_rng(3)
    rows = []
    for n in range(50):
        base = float(rng.uniform(2, 200))
        for month, factor in ((0, 1.0), (6, rng.uniform(0.3, 1.3)), (12, rng.uniform(0.0, 1.2))):
            rows.append(volume_row(f"sub-{n:02d}", month, base * factor, base * factor * 0.9, base * factor * 1.1))
    rows.append(volume_row("sub-50", 0, 30.0))  # seen once: its label is at month 0
    fig = spaghetti_figure(rows)
    (ax,) = fig.axes
    styles = [(line.get_color(), line.get_marker()) for line in ax.get_lines() if line.get_gid()]
    assert len(styles) == 51 and len(set(styles[:48])) == 48
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label:")]
    assert len(labels) == 51
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text alone, not its leader line
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b) or a.x1 <= b.x0 or b.x1 <= a.x0, "two end labels overlap"
    figure_box = fig.bbox
    assert all(figure_box.y0 <= b.y0 and b.y1 <= figure_box.y1 for b in boxes)


def test_spread_positions_keeps_order_and_gap():
    assert spread_positions([10.0, 10.0, 11.0], 5.0) == [10.0, 15.0, 20.0]
    assert spread_positions([3.0, 1.0], 5.0) == [6.0, 1.0]
    # Against the top bound the labels are pushed down instead.
    assert spread_positions([98.0, 99.0], 5.0, 0.0, 100.0) == [95.0, 100.0]


def test_linear_threshold_is_the_decade_of_the_smallest_volume():
    assert linear_threshold([0.0, 3.5, 120.0, None]) == 1.0
    assert linear_threshold([0.04, 2.0]) == pytest.approx(0.01)
    assert linear_threshold([0.0]) == 1.0


# ---------------------------------------------------------------- category counts


def test_category_counts_per_arm_include_not_assessed():
    months, counts = category_counts(ROWS, ALLOCATION, ARMS)
    assert months == [6, 12]
    (arm_a, per_a), (arm_b, per_b) = counts
    assert (arm_a, arm_b) == ("A", "B")
    # A = sub-01, 03, 05, 08. Month 6: no change, -, nearly complete, -; month 12: growth, partial, complete, -.
    assert per_a[NO_CHANGE] == [1, 0] and per_a[NEARLY_COMPLETE] == [1, 0]
    assert per_a[GROWTH] == [0, 1] and per_a[PARTIAL] == [0, 1] and per_a[COMPLETE] == [0, 1]
    assert per_a["not_assessed"] == [2, 1]
    assert [sum(per_b[c][i] for c in per_b) for i in range(2)] == [4, 4]


def test_category_counts_figure_stacks_every_category():
    fig = category_counts_figure(ROWS, ALLOCATION, ARMS, primary_month=12)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    assert len(ax.containers) == 6  # five categories + not assessed
    by_label = {c.get_label(): [b.get_height() for b in c] for c in ax.containers}
    assert by_label["not assessed"] == [2, 1]
    tops = [max(b.get_y() + b.get_height() for b in col) for col in zip(*ax.containers)]
    assert tops == [4, 4]  # every allocated participant counted at every month
    assert "(primary)" in ax.get_xticklabels()[1].get_text()
    payload = category_counts_png(ROWS, ALLOCATION, ARMS, primary_month=12)
    assert decode(payload).shape[:2] == expected_shape(fig)
    assert payload == category_counts_png(ROWS, ALLOCATION, ARMS, primary_month=12)


def test_unallocated_participants_are_left_out_and_said():
    allocation = {pid: arm for pid, arm in ALLOCATION.items() if pid != "sub-07"}
    fig = category_counts_figure(ROWS, allocation, ARMS)
    assert "1 with imaging but not allocated" in fig.get_suptitle()
    waterfall = waterfall_figure(ROWS, 12, allocation, ARMS)
    assert "1 with imaging but not allocated" in waterfall.get_suptitle()
    assert "sub-07" not in {b.get_gid() for ax in waterfall.axes for b in bars_of(ax)}


def test_category_counts_without_allocation_one_panel():
    fig = category_counts_figure(ROWS)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title() == "all participants (n=7)"


# ---------------------------------------------------------------- empty and formats


@pytest.mark.parametrize("make", [
    lambda: waterfall_png([], 12),
    lambda: waterfall_png([], 12, {}, []),
    lambda: spaghetti_png([]),
    lambda: spaghetti_png([volume_row("sub-01", 0, None, status="error")]),
    lambda: category_counts_png([]),
    lambda: category_counts_png([], {}, ARMS),
])
def test_empty_input_gives_a_no_data_figure(make):
    pixels = decode(make())
    assert pixels.shape[0] > 0 and pixels.shape[1] > 0


def test_no_data_figure_says_so():
    fig = waterfall_figure([], 12)
    assert any(t.get_text() == "no data" for t in fig.axes[0].texts)


def test_month_without_any_category_still_draws_panels():
    fig = waterfall_figure(ROWS, 24, ALLOCATION, ARMS)
    assert len(fig.axes) == 2
    assert all(len(bars_of(ax)) == 0 for ax in fig.axes)
    assert "4 not assessed" in fig.axes[0].get_xlabel()


def test_svg_is_reproducible():
    first = figure_bytes(waterfall_figure(ROWS, 12, ALLOCATION, ARMS), fmt="svg")
    second = figure_bytes(waterfall_figure(ROWS, 12, ALLOCATION, ARMS), fmt="svg")
    assert first == second
    assert b"<dc:date>" not in first
