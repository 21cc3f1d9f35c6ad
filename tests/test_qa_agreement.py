"""Reader agreement: known answers from data built so the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pingouin
import pytest
from statsmodels.stats.inter_rater import cohens_kappa

from khe_vol.qa.agreement import (
    AGREEMENT_COLUMNS,
    ORDERED_CATEGORIES,
    agreement_rows,
    bland_altman_log_ratio,
    category_table,
    comparisons,
    hd95_mm,
    icc_log_volume,
    mask_agreement,
    percent_agreement_category,
    weighted_kappa_category,
    write_agreement,
)
from khe_vol.overlap import dice
from khe_vol.response import COMPLETE, GROWTH, NEARLY_COMPLETE, NO_CHANGE, PARTIAL

VOLUMES_ML = [0.0, 2.5, 8.0, 15.0, 40.0, 95.0, 160.0, 300.0]
# Follow-up categories of eight series, two of each of four categories.
CATEGORIES = [COMPLETE, NEARLY_COMPLETE, PARTIAL, NO_CHANGE, GROWTH, PARTIAL, NO_CHANGE, NEARLY_COMPLETE]
ISO_1P5 = np.diag([1.5, 1.5, 1.5, 1.0])


def box_mask(shape=(20, 20, 20), start=(5, 5, 5), size=(8, 8, 8)):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = 1
    return mask


def reads(reader, volumes, categories, masks=None):
    out = []
    for i, (v, c) in enumerate(zip(volumes, categories)):
        read = {"participant_id": f"sub-{i:02d}", "session_id": "ses-m06", "month": 6,
                "reader": reader, "volume_ml": v, "category": c}
        if masks is not None:
            read.update(mask=masks[i], affine=ISO_1P5)
        out.append(read)
    return out


def by_measure(rows, comparison):
    return {r["measure"]: r for r in rows if r["comparison"] == comparison}


# ------------------------------------------------------------------ identical readers


def test_identical_readers_agree_perfectly():
    masks = [box_mask(start=(3 + i, 5, 5)) for i in range(len(VOLUMES_ML))]
    rows = agreement_rows(
        reads("R1", VOLUMES_ML, CATEGORIES, masks) + reads("R2", VOLUMES_ML, CATEGORIES, masks)
    )
    assert {r["comparison"] for r in rows} == {"R1 vs R2"}
    m = by_measure(rows, "R1 vs R2")
    assert m["n_series"]["estimate"] == 8
    assert m["icc_a1_log_volume"]["estimate"] == pytest.approx(1.0)
    assert m["icc_a1_log_volume"]["n"] == 8  # the 0 mL series stays in (log of volume + 1 mL)
    assert m["weighted_kappa_category"]["estimate"] == pytest.approx(1.0)
    assert m["percent_agreement_category"]["estimate"] == 100
    assert m["bland_altman_bias_ratio_percent"]["estimate"] == pytest.approx(0.0, abs=1e-12)
    assert m["bland_altman_bias_ratio_percent"]["n"] == 7  # no ratio with 0 mL
    assert "1 pair(s) with a 0 mL volume left out" in m["bland_altman_bias_ratio_percent"]["note"]
    for stat in ("median", "min", "max"):
        assert m[f"dice_edited_masks_{stat}"]["estimate"] == pytest.approx(1.0)
        assert m[f"hd95_edited_masks_{stat}_mm"]["estimate"] == pytest.approx(0.0)
    assert m["dice_edited_masks_median"]["n"] == 8


def test_comparisons_pair_readers_then_auto():
    assert comparisons(["R2", "auto", "R1", "R1"]) == [("R1", "R2"), ("R1", "auto"), ("R2", "auto")]
    assert comparisons(["auto", "R1"]) == [("R1", "auto")]


# ------------------------------------------------------------------ volumes


def test_constant_ten_percent_bias_shows_in_bland_altman():
    rng = np.random.default_rng(0)
    reference = rng.uniform(5, 400, size=30)
    rows = {r["measure"]: r for r in bland_altman_log_ratio(1.10 * reference, reference)}
    bias = rows["bland_altman_bias_ratio_percent"]
    assert bias["estimate"] == pytest.approx(10.0, abs=1e-9)
    assert bias["n"] == 30
    for name in ("lower", "upper"):
        assert rows[f"bland_altman_{name}_limit_ratio_percent"]["estimate"] == pytest.approx(10.0, abs=1e-6)
    # A 10% bias with +/-1% scatter: limits within ~2% of the bias.
    noisy = 1.10 * reference * np.exp(rng.normal(0, 0.01, size=30))
    rows = {r["measure"]: r for r in bland_altman_log_ratio(noisy, reference)}
    assert rows["bland_altman_bias_ratio_percent"]["estimate"] == pytest.approx(10.0, abs=0.6)
    low, high = (rows[f"bland_altman_{n}_limit_ratio_percent"]["estimate"] for n in ("lower", "upper"))
    assert 7 < low < 10 < high < 13
    ci = rows["bland_altman_bias_ratio_percent"]
    assert ci["ci_low"] < ci["estimate"] < ci["ci_high"]


def test_icc_drops_with_disagreement_and_matches_pingouin_label():
    a = np.array(VOLUMES_ML)
    row = icc_log_volume(a, a[::-1])  # readers in reverse order: no agreement
    assert row["estimate"] < 0
    assert row["ci_low"] < row["estimate"] < row["ci_high"]
    assert "ICC(A,1)" in row["method"]
    # Nearly identical readers: the CI brackets the estimate (pingouin's
    # default 2-decimal rounding of CI95 would give [1.00, 1.00] around 0.9994).
    rng = np.random.default_rng(1)
    b = a * np.exp(rng.normal(0, 0.1, a.size))
    row = icc_log_volume(a, b)
    assert 0.99 < row["estimate"] < 1
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"] < 1
    assert pingouin.options["round.column.CI95"] == 2  # global option restored


# ------------------------------------------------------------------ categories


def test_weighted_kappa_matches_statsmodels_on_a_five_category_table():
    # Built as a table first, then expanded into reads.
    table = np.array([
        [4, 1, 0, 0, 0],
        [1, 5, 2, 0, 0],
        [0, 2, 6, 1, 0],
        [0, 0, 1, 7, 2],
        [0, 0, 0, 1, 3],
    ])
    a, b = [], []
    for i, j in np.ndindex(table.shape):
        a += [ORDERED_CATEGORIES[i]] * table[i, j]
        b += [ORDERED_CATEGORIES[j]] * table[i, j]
    np.testing.assert_array_equal(category_table(a, b), table)
    expected = cohens_kappa(table, weights=[0, 1, 2, 3, 4], wt="linear")
    row = weighted_kappa_category(a, b)
    assert row["estimate"] == pytest.approx(expected.kappa)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.kappa_low, expected.kappa_upp))
    # Independently from the definition: 1 - sum(w * observed) / sum(w * expected), w = |i - j| / 4.
    w = np.abs(np.subtract.outer(np.arange(5), np.arange(5))) / 4
    p = table / table.sum()
    chance = np.outer(p.sum(axis=1), p.sum(axis=0))
    assert row["estimate"] == pytest.approx(1 - (w * p).sum() / (w * chance).sum())
    assert row["n"] == table.sum() == 36
    assert -1 <= row["ci_low"] < row["estimate"] < row["ci_high"] <= 1


def test_weighted_kappa_known_cases():
    # Perfect disagreement at the two ends of the scale: kappa = -1.
    a = [COMPLETE] * 5 + [GROWTH] * 5
    assert weighted_kappa_category(a, a[::-1])["estimate"] == pytest.approx(-1.0)
    # Two adjacent categories: weighted = Cohen's kappa of the 2x2 table
    # [[20, 5], [10, 15]]: po = 0.7, pe = 0.5, kappa = 0.4.
    a = [PARTIAL] * 25 + [NO_CHANGE] * 25
    b = [PARTIAL] * 20 + [NO_CHANGE] * 5 + [PARTIAL] * 10 + [NO_CHANGE] * 15
    assert weighted_kappa_category(a, b)["estimate"] == pytest.approx(0.4)
    assert percent_agreement_category(a, b)["estimate"] == pytest.approx(70.0)


# ------------------------------------------------------------------ masks


def test_mask_shifted_two_voxels_gives_hd95_three_mm():
    a = box_mask()
    b = box_mask(start=(7, 5, 5))  # 2 voxels of 1.5 mm along i
    assert hd95_mm(a, b, ISO_1P5) == pytest.approx(3.0)
    assert dice(a, b) == pytest.approx(2 * 6 / 16)
    # Same answer with the grid rotated and flipped: distances are physical.
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[0, -1.5, 0], [0, 0, 1.5], [-1.5, 0, 0]])
    assert hd95_mm(a, b, oblique) == pytest.approx(3.0)
    # And with anisotropic voxels, the shift axis sets the distance.
    assert hd95_mm(a, b, np.diag([1.5, 0.5, 4.0, 1.0])) == pytest.approx(3.0)


def test_masks_on_different_grids_are_compared_by_position():
    a = box_mask()
    flipped_affine = ISO_1P5 @ np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    rows = {r["measure"]: r for r in mask_agreement([(a, ISO_1P5, a[::-1], flipped_affine)])}
    assert rows["dice_edited_masks_median"]["estimate"] == pytest.approx(1.0)
    assert "different grids" in rows["dice_edited_masks_median"]["note"]


def test_empty_masks():
    a, empty = box_mask(), np.zeros((20, 20, 20), np.uint8)
    rows = {r["measure"]: r for r in mask_agreement([(a, ISO_1P5, empty, ISO_1P5), (empty, ISO_1P5, empty, ISO_1P5)])}
    assert rows["dice_edited_masks_median"]["estimate"] == 0.0
    assert rows["dice_edited_masks_median"]["n"] == 1
    assert rows["hd95_edited_masks_median_mm"]["estimate"] is None
    assert "one empty mask" in rows["hd95_edited_masks_median_mm"]["note"]
    assert "two empty masks" in rows["dice_edited_masks_median"]["note"]


# ------------------------------------------------------------------ degenerate inputs


@pytest.mark.parametrize(
    ("volumes", "categories", "why"),
    [
        ([], [], "fewer than"),
        ([12.0], [PARTIAL], "fewer than"),
        ([12.0, 12.0, 12.0], [PARTIAL, PARTIAL, PARTIAL], None),
    ],
)
def test_degenerate_inputs_give_na_rows(volumes, categories, why):
    rows = agreement_rows(reads("R1", volumes, categories) + reads("R2", volumes, categories))
    if not volumes:
        assert rows == []  # no reads at all: no comparison to report
        rows = [dict(r, comparison="R1 vs R2") for r in
                [icc_log_volume([], []), weighted_kappa_category([], []), *mask_agreement([])]]
    m = {r["measure"]: r for r in rows}
    for name in ("icc_a1_log_volume", "weighted_kappa_category", "dice_edited_masks_median"):
        assert m[name]["estimate"] is None
        assert m[name]["note"]
        if why:
            assert why in m[name]["note"] or "no series" in m[name]["note"]
    if len(volumes) == 3:
        assert "no between-series variance" in m["icc_a1_log_volume"]["note"]
        assert "chance agreement is 1" in m["weighted_kappa_category"]["note"]
        assert m["bland_altman_bias_ratio_percent"]["estimate"] == pytest.approx(0.0)


def test_missing_volumes_and_baselines_are_left_out():
    r1 = reads("R1", [10.0, None, 30.0, 40.0], [None, PARTIAL, GROWTH, NO_CHANGE])
    r2 = reads("R2", [11.0, 20.0, None, 44.0], [None, PARTIAL, GROWTH, GROWTH])
    auto = reads("auto", [10.0, 20.0, 30.0, 40.0], [None, PARTIAL, GROWTH, NO_CHANGE])[:2]
    rows = agreement_rows(r1 + r2 + auto)
    m = by_measure(rows, "R1 vs R2")
    assert m["n_series"]["estimate"] == 4
    assert m["icc_a1_log_volume"]["n"] == 2
    assert "fewer than 3 paired series" in m["icc_a1_log_volume"]["note"]
    assert m["weighted_kappa_category"]["n"] == 3
    assert by_measure(rows, "R2 vs auto")["n_series"]["estimate"] == 2


def test_two_reads_of_one_series_by_one_reader_is_an_error():
    with pytest.raises(ValueError, match="R1 has two reads of sub-00 ses-m06"):
        agreement_rows(reads("R1", [1.0, 2.0], [PARTIAL, PARTIAL])[:1] * 2 + reads("R2", [1.0], [PARTIAL]))


# ------------------------------------------------------------------ writer


def test_write_agreement_tsv_and_dictionary(tmp_path):
    rows = agreement_rows(reads("R1", VOLUMES_ML, CATEGORIES) + reads("auto", [v / 1.1 for v in VOLUMES_ML], CATEGORIES))
    path = tmp_path / "qa_agreement.tsv"
    write_agreement(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == list(AGREEMENT_COLUMNS)
    table = [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert len(table) == len(rows)
    bias = next(r for r in table if r["measure"] == "bland_altman_bias_ratio_percent")
    assert bias["estimate"] == "10.00" and bias["comparison"] == "R1 vs auto"
    n_series = next(r for r in table if r["measure"] == "n_series")
    assert n_series["estimate"] == "8" and n_series["ci_low"] == "n/a"
    dice = next(r for r in table if r["measure"] == "dice_edited_masks_median")
    assert dice["estimate"] == "n/a" and "no series" in dice["note"]
    dictionary = json.loads((tmp_path / "qa_agreement.json").read_text())
    assert set(dictionary) == set(AGREEMENT_COLUMNS)
    assert {r["measure"] for r in rows} <= set(dictionary["measure"]["Levels"])
    assert "1 mL" in dictionary["measure"]["Levels"]["icc_a1_log_volume"]
