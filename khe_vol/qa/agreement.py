"""Agreement between blinded readers, and of each reader with the automatic result.

Input is one *read* per reader per series: a dict with ``participant_id``,
``session_id``, ``month``, ``reader`` (``"R1"``, ``"R2"``, ... or
:data:`AUTO_READER` for the automatic result), ``volume_ml`` (float or
``None``), ``category`` (one of :data:`khe_vol.response.CATEGORIES`, or
``None`` for a baseline) and optionally ``mask`` (an ``(I, J, K)`` array on
the series grid) with ``affine`` (its voxel -> RAS+ mm affine).

Output is a list of rows for ``qa_agreement.tsv`` (see
:data:`AGREEMENT_COLUMNS`), one per comparison and measure, raw numbers
(``None`` = not estimable); :func:`write_agreement` formats them once.

Choices (also stated in the data dictionary):

* **Zero volumes.** Complete involution is 0 mL, where a logarithm is
  undefined. The ICC uses ``ln(volume_ml + 1 mL)`` so those series, where
  reader disagreement matters most, stay in; 1 mL is small against KHE
  volumes (tens to hundreds of mL), so the scale stays close to a log
  scale. Bland-Altman is on ``ln(volume_ml)`` and reports *ratios*, which a
  0 mL read cannot have: such pairs are left out and counted in ``note``.
  Agreement on "no lesion left" is measured by the category kappa instead.
* **Categories** are ordered complete < nearly complete < partial <
  no change < growth and weighted linearly (Cicchetti-Allison), on the full
  5x5 table even when a category is unused, so that the weights mean the
  same distance in every study.
* **HD95** is the larger of the two directed 95th percentiles of
  contour-to-contour distances (symmetric, like the Hausdorff distance),
  measured in mm on the physical spacing of the series grid.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pingouin
import SimpleITK as sitk
from scipy import stats
from statsmodels.stats.inter_rater import cohens_kappa
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW

from khe_vol.files import NA
from khe_vol.geometry import from_sitk, resample_mask_to_grid, to_sitk
from khe_vol.overlap import cropped_pair, dice
from khe_vol.response import (
    CATEGORIES,
    COMPLETE,
    GROWTH,
    NEARLY_COMPLETE,
    NO_CHANGE,
    PARTIAL,
)
from khe_vol.tables import write_table

#: Reader id of the automatic result in the reads.
AUTO_READER = "auto"

#: Response categories from least to most lesion left (the order kappa weights).
ORDERED_CATEGORIES = (COMPLETE, NEARLY_COMPLETE, PARTIAL, NO_CHANGE, GROWTH)

#: Added to every volume before the log in the ICC, in mL (see module docstring).
LOG_OFFSET_ML = 1.0

#: Normal quantile of the Bland-Altman 95% limits of agreement.
LOA_Z = 1.96

#: Percentile of surface distances reported as HD95.
HD_PERCENTILE = 95.0

ALPHA = 0.05

assert set(ORDERED_CATEGORIES) == set(CATEGORIES)

_METHOD_ICC = "pingouin.intraclass_corr, Type ICC(A,1) (ICC2): two-way random, absolute agreement, single rater; F-based 95% CI"
# statsmodels (mean_diff_plot) and pingouin (plot_blandaltman) only draw
# Bland-Altman plots, so bias and limits are computed here from their definition.
_METHOD_BA = (
    "d = ln(A) - ln(B); bias = mean(d), t 95% CI (statsmodels DescrStatsW.tconfint_mean); "
    "limits = bias +/- 1.96 SD(d, ddof=1), 95% CI from SE = sqrt(3 SD^2/n) and t(n-1) (Bland & Altman 1986); "
    "shown as 100 (exp(x) - 1)"
)
_METHOD_KAPPA = "statsmodels.stats.inter_rater.cohens_kappa(table, wt='linear'), 5x5 ordered table; asymptotic 95% CI clipped to [-1, 1]"
_METHOD_PERCENT = "share of series with equal categories; Wilson 95% CI (statsmodels proportion_confint)"
_METHOD_DICE = "SimpleITK LabelOverlapMeasuresImageFilter.GetDiceCoefficient per series; {} over series"
_METHOD_HD95 = (
    "SimpleITK LabelContour + SignedMaurerDistanceMap (useImageSpacing) per series; HD95 = max of the "
    "two directed 95th percentiles of contour-to-contour distances; {} over series"
)

AGREEMENT_COLUMNS = {
    "comparison": {
        "LongName": "Compared readers",
        "Description": "'A vs B': two blinded readers, or a reader and 'auto' (the automatic result). Differences and ratios are A relative to B.",
    },
    "measure": {
        "LongName": "Agreement measure",
        "Description": "What the row estimates.",
        "Levels": {
            "n_series": "Series read by both (estimate = the count).",
            "icc_a1_log_volume": "ICC(A,1), two-way random effects, absolute agreement, single rater, of ln(volume_ml + 1 mL). The 1 mL offset keeps 0 mL (complete involution) series in.",
            "bland_altman_bias_ratio_percent": "Bland-Altman bias on ln(volume_ml), back-transformed: 100 x (geometric-mean ratio A/B - 1). Pairs with a 0 mL read are left out (no ratio); see note.",
            "bland_altman_lower_limit_ratio_percent": "Lower 95% limit of agreement (bias - 1.96 SD on ln scale), as 100 x (ratio - 1).",
            "bland_altman_upper_limit_ratio_percent": "Upper 95% limit of agreement (bias + 1.96 SD on ln scale), as 100 x (ratio - 1).",
            "weighted_kappa_category": "Linearly weighted Cohen's kappa of the response category over the ordered scale complete < nearly complete < partial < no change < growth (follow-up series).",
            "percent_agreement_category": "Share of follow-up series where both gave the same category.",
            "dice_edited_masks_median": "Median Dice coefficient of the two masks, over series where both have a non-empty mask.",
            "dice_edited_masks_min": "Smallest Dice coefficient over those series.",
            "dice_edited_masks_max": "Largest Dice coefficient over those series.",
            "hd95_edited_masks_median_mm": "Median 95th-percentile Hausdorff distance (max of the two directed 95th percentiles of contour distances), in mm on the series grid's physical spacing.",
            "hd95_edited_masks_min_mm": "Smallest HD95 over those series.",
            "hd95_edited_masks_max_mm": "Largest HD95 over those series.",
        },
    },
    "estimate": {"LongName": "Estimate", "Description": "Value of the measure, in the row's units; n/a when not estimable (see note)."},
    "ci_low": {"LongName": "Lower 95% confidence limit", "Description": "Lower limit of the 95% confidence interval of the estimate (n/a for counts, medians and ranges)."},
    "ci_high": {"LongName": "Upper 95% confidence limit", "Description": "Upper limit of the 95% confidence interval of the estimate."},
    "n": {"LongName": "Number of series", "Description": "Paired series that entered the estimate."},
    "units": {
        "LongName": "Units of estimate",
        "Description": "Units of estimate, ci_low and ci_high.",
        "Levels": {"series": "count of series", "dimensionless": "coefficient in [-1, 1] or [0, 1]", "%": "percent", "mm": "millimetres"},
    },
    "method": {"LongName": "Method", "Description": "Library and function that computed the estimate, and how."},
    "note": {"LongName": "Note", "Description": "Why a value is n/a, and which series were left out."},
}

_FORMATS = {"series": "d", "dimensionless": ".4f", "%": ".2f", "mm": ".2f"}


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _row(measure, units, method, n, estimate=None, ci=(None, None), note=None):
    """One result row; non-finite numbers become None (written n/a)."""
    return {
        "measure": measure,
        "estimate": _finite_or_none(estimate),
        "ci_low": _finite_or_none(ci[0]),
        "ci_high": _finite_or_none(ci[1]),
        "n": int(n),
        "units": units,
        "method": method,
        "note": note,
    }


def _too_few(n):
    return f"fewer than 2 paired series (n={n})"


# ---------------------------------------------------------------- volumes


def icc_log_volume(volumes_a_ml, volumes_b_ml):
    """ICC(A,1) of ``ln(volume_ml + LOG_OFFSET_ML)`` between two readers.

    Parameters
    ----------
    volumes_a_ml, volumes_b_ml : sequence of float
        Paired lesion volumes of the same series by readers A and B, in mL
        (>= 0).

    Returns
    -------
    dict
        Row ``icc_a1_log_volume`` (dimensionless) with its 95% CI.
    """
    a = np.log(np.asarray(volumes_a_ml, dtype=float) + LOG_OFFSET_ML)
    b = np.log(np.asarray(volumes_b_ml, dtype=float) + LOG_OFFSET_ML)
    n = a.size
    row = _row("icc_a1_log_volume", "dimensionless", _METHOD_ICC, n)
    if n < 3:
        # pingouin's two-way ANOVA needs at least 5 ratings, i.e. 3 series.
        return {**row, "note": f"fewer than 3 paired series (n={n}); the ICC's two-way ANOVA needs 3"}
    if np.ptp(np.concatenate([a, b])) == 0:
        return {**row, "note": "every volume is the same, so there is no between-series variance and the ICC is undefined"}
    long = pd.DataFrame({
        "series": np.tile(np.arange(n), 2),
        "reader": ["a"] * n + ["b"] * n,
        "log_volume": np.concatenate([a, b]),
    })
    with warnings.catch_warnings(), _pingouin_unrounded_ci():
        # Exact agreement gives a zero residual mean square: pingouin then
        # divides by zero inside its F statistics, harmlessly for the ICC.
        # Its pandas deprecation warnings are pingouin's to fix, not ours.
        warnings.simplefilter("ignore")
        table = pingouin.intraclass_corr(long, targets="series", raters="reader", ratings="log_volume")
    # pingouin 0.5 labels the row "ICC2" and the CI "CI95%"; 0.7 "ICC(A,1)" and "CI95".
    icc = table[table["Type"].isin(["ICC(A,1)", "ICC2"])].iloc[0]
    ci = icc["CI95"] if "CI95" in icc.index else icc["CI95%"]
    row = {**row, "estimate": _finite_or_none(icc["ICC"]), "ci_low": _finite_or_none(ci[0]), "ci_high": _finite_or_none(ci[1])}
    if row["ci_low"] is None or row["ci_high"] is None:
        row["note"] = "95% CI not computable: zero residual variance (the readers differ by the same amount, or not at all, on every series)"
    return row


@contextlib.contextmanager
def _pingouin_unrounded_ci():
    """Turn off pingouin's default rounding of CI95 to 2 decimals, then restore it.

    Rounded limits can land on the wrong side of the estimate (0.9994 with a
    CI of [1.00, 1.00]); numbers are rounded once, by :func:`write_agreement`.
    """
    keys = ("round.column.CI95", "round.column.CI95%")  # pingouin 0.7, 0.5
    saved = {k: pingouin.options[k] for k in keys if k in pingouin.options}
    try:
        for k in keys:
            pingouin.options[k] = None
        yield
    finally:
        for k in keys:
            pingouin.options.pop(k, None)
        pingouin.options.update(saved)


def bland_altman_log_ratio(volumes_a_ml, volumes_b_ml):
    """Bland-Altman bias and 95% limits of agreement of log volume, as ratios.

    Parameters
    ----------
    volumes_a_ml, volumes_b_ml : sequence of float
        Paired lesion volumes of the same series by readers A and B, in mL.
        Pairs with a 0 mL volume have no ratio and are left out.

    Returns
    -------
    list of dict
        Rows ``bland_altman_bias_ratio_percent``,
        ``bland_altman_lower_limit_ratio_percent`` and
        ``bland_altman_upper_limit_ratio_percent``, each in % (``100 x
        (ratio A/B - 1)``) with a 95% CI.
    """
    a = np.asarray(volumes_a_ml, dtype=float)
    b = np.asarray(volumes_b_ml, dtype=float)
    positive = (a > 0) & (b > 0)
    n, n_zero = int(positive.sum()), int((~positive).sum())
    note = f"{n_zero} pair(s) with a 0 mL volume left out (ratio undefined)" if n_zero else None
    measures = ("bias", "lower_limit", "upper_limit")
    rows = [_row(f"bland_altman_{m}_ratio_percent", "%", _METHOD_BA, n, note=note) for m in measures]
    if n < 2:
        return [{**r, "note": "; ".join(filter(None, [_too_few(n), note]))} for r in rows]
    d = DescrStatsW(np.log(a[positive]) - np.log(b[positive]), ddof=1)
    bias, sd = d.mean, d.std
    loa_se = math.sqrt(3 * sd**2 / n)
    t = stats.t.ppf(1 - ALPHA / 2, n - 1)
    log_values = {
        "bias": (bias, d.tconfint_mean(alpha=ALPHA)),
        "lower_limit": (bias - LOA_Z * sd, (bias - LOA_Z * sd - t * loa_se, bias - LOA_Z * sd + t * loa_se)),
        "upper_limit": (bias + LOA_Z * sd, (bias + LOA_Z * sd - t * loa_se, bias + LOA_Z * sd + t * loa_se)),
    }

    def percent(x):
        return 100 * math.expm1(x)

    out = []
    for row, m in zip(rows, measures):
        est, (lo, hi) = log_values[m]
        out.append({**row, "estimate": percent(est), "ci_low": percent(lo), "ci_high": percent(hi)})
    return out


# ---------------------------------------------------------------- categories


def category_table(categories_a, categories_b):
    """5x5 contingency table of paired categories (rows A, columns B).

    Rows and columns follow :data:`ORDERED_CATEGORIES`; unused categories
    keep their (zero) row and column.
    """
    index = {c: i for i, c in enumerate(ORDERED_CATEGORIES)}
    table = np.zeros((len(index), len(index)), dtype=int)
    for ca, cb in zip(categories_a, categories_b):
        for c in (ca, cb):
            if c not in index:
                raise ValueError(f"unknown response category {c!r}; expected one of {', '.join(ORDERED_CATEGORIES)}")
        table[index[ca], index[cb]] += 1
    return table


def weighted_kappa_category(categories_a, categories_b):
    """Linearly weighted kappa of response categories between two readers.

    Parameters
    ----------
    categories_a, categories_b : sequence of str
        Paired categories of the same follow-up series.

    Returns
    -------
    dict
        Row ``weighted_kappa_category`` (dimensionless) with its asymptotic
        95% CI.
    """
    table = category_table(categories_a, categories_b)
    n = int(table.sum())
    row = _row("weighted_kappa_category", "dimensionless", _METHOD_KAPPA, n)
    if n < 2:
        return {**row, "note": _too_few(n)}
    if len(set(categories_a) | set(categories_b)) == 1:
        return {**row, "note": f"both readers gave {categories_a[0]} for every series: chance agreement is 1 and kappa is undefined"}
    # Scores 0..4 in ORDERED_CATEGORIES order; 'linear' weights |i - j| / 4.
    res = cohens_kappa(table, weights=np.arange(len(ORDERED_CATEGORIES)), wt="linear")
    # The asymptotic normal CI can pass the bounds of kappa; clip to [-1, 1].
    ci = (max(res.kappa_low, -1.0), min(res.kappa_upp, 1.0))
    return {**row, "estimate": _finite_or_none(res.kappa), "ci_low": _finite_or_none(ci[0]), "ci_high": _finite_or_none(ci[1])}


def percent_agreement_category(categories_a, categories_b):
    """Percent of series with the same category, with a Wilson 95% CI."""
    n = len(categories_a)
    row = _row("percent_agreement_category", "%", _METHOD_PERCENT, n)
    if n < 2:
        return {**row, "note": _too_few(n)}
    agree = sum(ca == cb for ca, cb in zip(categories_a, categories_b))
    lo, hi = proportion_confint(agree, n, alpha=ALPHA, method="wilson")
    return {**row, "estimate": 100 * agree / n, "ci_low": 100 * lo, "ci_high": 100 * hi}


# ---------------------------------------------------------------- masks


def _directed_contour_distances_mm(source, target):
    """Distances (mm) from each contour voxel of ``source`` to the contour of ``target``."""
    # Distance from every voxel to the nearest target contour voxel centre,
    # in mm on the image's physical spacing (0 on the target contour).
    to_target = sitk.Abs(sitk.SignedMaurerDistanceMap(target, squaredDistance=False, useImageSpacing=True))
    # Copies, not views: a view of a temporary SimpleITK image outlives its buffer.
    contour = from_sitk(sitk.LabelContour(source))[0] != 0
    return from_sitk(to_target)[0][contour]


def hd95_mm(mask_a, mask_b, affine):
    """95th-percentile Hausdorff distance between two masks, in mm.

    Parameters
    ----------
    mask_a, mask_b : (I, J, K) array_like
        Non-empty masks on one grid; non-zero = lesion.
    affine : (4, 4) array_like
        Voxel -> RAS+ mm affine of the grid; its voxel sizes set the mm.

    Returns
    -------
    float
        Larger of the 95th percentiles of the distances from A's contour
        voxels to B's contour and from B's to A's, in mm.
    """
    a, b = np.asarray(mask_a) != 0, np.asarray(mask_b) != 0
    if not (a.any() and b.any()):
        raise ValueError("HD95 is undefined when a mask is empty")
    a, b, aff = cropped_pair(a, b, np.asarray(affine, dtype=float))
    image_a, image_b = to_sitk(a.astype(np.uint8), aff), to_sitk(b.astype(np.uint8), aff)
    return float(max(
        np.percentile(_directed_contour_distances_mm(image_a, image_b), HD_PERCENTILE),
        np.percentile(_directed_contour_distances_mm(image_b, image_a), HD_PERCENTILE),
    ))


def _summary_rows(name, units, method, values, note):
    n = len(values)
    suffix = "_mm" if units == "mm" else ""
    rows = [_row(f"{name}_{stat}{suffix}", units, method.format(stat), n, note=note) for stat in ("median", "min", "max")]
    if n == 0:
        return [{**r, "note": "; ".join(filter(None, ["no series with non-empty masks from both", note]))} for r in rows]
    for r, fn in zip(rows, (np.median, np.min, np.max)):
        r["estimate"] = float(fn(values))
    return rows


def mask_agreement(mask_pairs):
    """Dice and HD95 summaries over series where both have a mask.

    Parameters
    ----------
    mask_pairs : sequence of tuple
        ``(mask_a, affine_a, mask_b, affine_b)`` per series. Masks on
        different grids are compared on A's grid (B brought there by
        physical position).

    Returns
    -------
    list of dict
        Rows ``dice_edited_masks_{median,min,max}`` (dimensionless) and
        ``hd95_edited_masks_{median,min,max}_mm`` (mm).
    """
    dices, hd95 = [], []
    n_both_empty = n_one_empty = n_resampled = 0
    for mask_a, affine_a, mask_b, affine_b in mask_pairs:
        mask_a, mask_b = np.asarray(mask_a) != 0, np.asarray(mask_b) != 0
        if mask_a.shape != mask_b.shape or not np.allclose(affine_a, affine_b, atol=1e-4):
            mask_b = resample_mask_to_grid(mask_b, affine_b, mask_a.shape, affine_a) != 0
            n_resampled += 1
        if not (mask_a.any() or mask_b.any()):
            n_both_empty += 1
            continue
        dices.append(dice(mask_a, mask_b))
        if mask_a.any() and mask_b.any():
            hd95.append(hd95_mm(mask_a, mask_b, affine_a))
        else:
            n_one_empty += 1
    notes = [
        f"{n_both_empty} series with two empty masks left out (Dice undefined)" if n_both_empty else None,
        f"{n_resampled} mask pair(s) on different grids compared on the first reader's grid" if n_resampled else None,
    ]
    hd_note = f"{n_one_empty} series with one empty mask left out (distance undefined)" if n_one_empty else None
    note = "; ".join(filter(None, notes)) or None
    return (
        _summary_rows("dice_edited_masks", "dimensionless", _METHOD_DICE, dices, note)
        + _summary_rows("hd95_edited_masks", "mm", _METHOD_HD95, hd95, "; ".join(filter(None, [*notes, hd_note])) or None)
    )


# ---------------------------------------------------------------- cohort


def comparisons(readers):
    """Pairs to compare: every two human readers, then each human reader vs auto.

    Parameters
    ----------
    readers : iterable of str

    Returns
    -------
    list of (str, str)
    """
    readers = set(readers)
    humans = sorted(readers - {AUTO_READER})
    pairs = list(itertools.combinations(humans, 2))
    if AUTO_READER in readers:
        pairs += [(r, AUTO_READER) for r in humans]
    return pairs


def _reads_by_series(reads, reader):
    out = {}
    for read in reads:
        if read["reader"] != reader:
            continue
        key = (read["participant_id"], read["session_id"])
        if key in out:
            raise ValueError(f"reader {reader} has two reads of {key[0]} {key[1]}; pass one read per reader per series")
        out[key] = read
    return out


def paired_reads(reads, reader_a, reader_b):
    """Reads of the series both readers read, as ``(read_a, read_b)`` pairs.

    Pairs are sorted by participant and session, so results do not depend
    on the order of ``reads``.
    """
    a, b = _reads_by_series(reads, reader_a), _reads_by_series(reads, reader_b)
    return [(a[key], b[key]) for key in sorted(a.keys() & b.keys())]


def compare_readers(pairs):
    """All agreement rows of one comparison (without the ``comparison`` key).

    Parameters
    ----------
    pairs : list of (dict, dict)
        Paired reads, as :func:`paired_reads` returns.

    Returns
    -------
    list of dict
    """
    volumes = [(a["volume_ml"], b["volume_ml"]) for a, b in pairs
               if a.get("volume_ml") is not None and b.get("volume_ml") is not None]
    categories = [(a["category"], b["category"]) for a, b in pairs
                  if a.get("category") is not None and b.get("category") is not None]
    masks = [(a["mask"], a["affine"], b["mask"], b["affine"]) for a, b in pairs
             if a.get("mask") is not None and b.get("mask") is not None]
    vol_a, vol_b = ([v[i] for v in volumes] for i in (0, 1))
    cat_a, cat_b = ([c[i] for c in categories] for i in (0, 1))
    n_no_volume = len(pairs) - len(volumes)
    count = _row("n_series", "series", "count of series read by both", len(pairs), len(pairs),
                 note=f"{n_no_volume} without a volume from both" if n_no_volume else None)
    return [
        count,
        icc_log_volume(vol_a, vol_b),
        *bland_altman_log_ratio(vol_a, vol_b),
        weighted_kappa_category(cat_a, cat_b),
        percent_agreement_category(cat_a, cat_b),
        *mask_agreement(masks),
    ]


def agreement_rows(reads):
    """Agreement rows of every comparison found in the reads.

    Parameters
    ----------
    reads : list of dict
        One read per reader per series (see the module docstring).

    Returns
    -------
    list of dict
        Rows with the keys of :data:`AGREEMENT_COLUMNS`, numbers unformatted
        (``None`` = not estimable).
    """
    rows = []
    for reader_a, reader_b in comparisons(r["reader"] for r in reads):
        for row in compare_readers(paired_reads(reads, reader_a, reader_b)):
            rows.append({"comparison": f"{reader_a} vs {reader_b}", **row})
    return rows


def _present(row):
    """Row of strings for the TSV: numbers formatted once, here."""
    spec = _FORMATS[row["units"]]
    out = {}
    for col in AGREEMENT_COLUMNS:
        value = row.get(col)
        if col in ("estimate", "ci_low", "ci_high") and value is not None:
            value = format(int(value) if spec == "d" else value, spec)
        out[col] = NA if value is None else str(value)
    return out


def write_agreement(path, rows, provenance=None):
    """Write ``qa_agreement.tsv`` and its JSON data dictionary (``.json``) atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.tsv``.
    rows : list of dict
        As :func:`agreement_rows` returns.
    """
    write_table(path, AGREEMENT_COLUMNS, [_present(r) for r in rows], provenance)


# --------------------------------------------------------------------------
# Time per read, per reader (``qa_reader_times.tsv``).
# --------------------------------------------------------------------------

#: Percentile reported beside the median time per case.
TIME_PERCENTILE = 90.0

READER_TIME_COLUMNS = {
    "reader": {"LongName": "Reader", "Description": "Reader id (blinded readers and the adjudicator)."},
    "n_reads": {"LongName": "Cases read", "Description": "Cases with a verdict (their latest revision counts)."},
    "n_timed": {
        "LongName": "Cases timed",
        "Description": "Cases read whose every revision carries a time (reads from before timing, or over "
        "4 h open, have none); the times below are over these.",
    },
    "median_seconds": {
        "LongName": "Median time per case",
        "Description": "Median over timed cases of the seconds from opening the case page to the verdict, "
        "summed over the case's revisions (each revision timed from the page opening or the previous verdict "
        "on it).",
        "Units": "s",
    },
    "p90_seconds": {
        "LongName": "90th percentile of time per case",
        "Description": "90th percentile (numpy linear interpolation) of the same times.",
        "Units": "s",
    },
    "share_accepted_without_edit": {
        "LongName": "Share accepted without edit",
        "Description": "Cases whose verdict is Accept (the proposed mask as it was) / cases read. An accepted "
        "clicked mask is an Edited read.",
    },
    "n_edited": {"LongName": "Cases edited", "Description": "Cases whose verdict is Edited (pen or clicks)."},
    "median_edit_seconds": {
        "LongName": "Median edit time",
        "Description": "Median over edited cases of the seconds from the first edit action to the save, "
        "summed over the case's edited revisions (cases whose edited revisions all carry an edit time).",
        "Units": "s",
    },
    "note": {"LongName": "Note", "Description": "Why a value is n/a, and how many cases had no time."},
}


def _sum_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else float(sum(values))


def reader_time_rows(reads, readers):
    """Per reader: how long reading took, and how often the proposed mask was accepted as it was.

    Parameters
    ----------
    reads : list of dict
        Every revision of every case (:func:`khe_vol.qa.store.all_reads`):
        ``reader``, ``case_code``, ``revision``, ``verdict``,
        ``seconds_to_verdict`` and ``edit_seconds`` (s, None = not measured).
    readers : list of str
        One row each, in this order (a reader without reads gets a row of n/a).

    Returns
    -------
    list of dict
        Keys of :data:`READER_TIME_COLUMNS`, numbers unrounded (None = not estimable).
    """
    rows = []
    for reader in readers:
        cases = {}
        for r in sorted((r for r in reads if r["reader"] == reader), key=lambda r: (r["case_code"], r["revision"])):
            cases.setdefault(r["case_code"], []).append(r)
        totals = [_sum_or_none(r.get("seconds_to_verdict") for r in revs) for revs in cases.values()]
        timed = [t for t in totals if t is not None]
        verdicts = [revs[-1]["verdict"] for revs in cases.values()]
        edits = [_sum_or_none(r.get("edit_seconds") for r in revs if r["verdict"] == "edited")
                 for revs in cases.values() if revs[-1]["verdict"] == "edited"]
        edits_timed = [e for e in edits if e is not None]
        notes = []
        if not cases:
            notes.append("no reads")
        elif len(timed) < len(totals):
            notes.append(f"{len(totals) - len(timed)} case(s) without a time (read before timing, or open over 4 h)")
        if len(edits_timed) < len(edits):
            notes.append(f"{len(edits) - len(edits_timed)} edited case(s) without an edit time")
        rows.append({
            "reader": reader,
            "n_reads": len(cases),
            "n_timed": len(timed),
            "median_seconds": float(np.median(timed)) if timed else None,
            "p90_seconds": float(np.percentile(timed, TIME_PERCENTILE)) if timed else None,
            "share_accepted_without_edit": verdicts.count("accept") / len(verdicts) if verdicts else None,
            "n_edited": len(edits),
            "median_edit_seconds": float(np.median(edits_timed)) if edits_timed else None,
            "note": "; ".join(notes) or None,
        })
    return rows


def write_reader_times(path, rows, provenance=None):
    """Write ``qa_reader_times.tsv`` and its JSON dictionary; seconds to 0.1 s, shares to 0.001."""
    def fmt(col, value):
        if value is None:
            return NA
        if col.endswith("seconds"):
            return f"{value:.1f}"
        if col.startswith("share"):
            return f"{value:.3f}"
        return str(value)

    write_table(path, READER_TIME_COLUMNS, [{c: fmt(c, r.get(c)) for c in READER_TIME_COLUMNS} for r in rows],
                provenance)
