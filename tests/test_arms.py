"""Response by arm: known answers checked against independent calculations."""

from __future__ import annotations

import csv
import json
import math

import pytest
from scipy import stats
from statsmodels.stats.proportion import confint_proportions_2indep

from khe_vol.arms import (
    ARM_CATEGORIES,
    ARM_COLUMNS,
    NOT_ASSESSED,
    categories_by_month,
    compare_two_arms,
    read_allocation,
    response_by_arm,
    write_response_by_arm,
)
from khe_vol.response import (
    CATEGORIES,
    COMPLETE,
    GROWTH,
    NEARLY_COMPLETE,
    NO_CHANGE,
    PARTIAL,
)

Z95 = 1.959963984540054  # standard normal 0.975 quantile
SESSION_OF_MONTH = {6: "ses-m06", 12: "ses-m12", 24: "ses-m24"}


def response_row(pid, month, category, status="ok"):
    """A response.tsv row as strings, as tables.response_rows writes it."""
    ok = status == "ok"
    return {
        "participant_id": pid,
        "session_id": SESSION_OF_MONTH[month],
        "month": str(month),
        "category": category if ok else "n/a",
        "overall_response": str(int(category in (PARTIAL, NEARLY_COMPLETE, COMPLETE))) if ok else "n/a",
        "good_response": str(int(category in (NEARLY_COMPLETE, COMPLETE))) if ok else "n/a",
        "status": status,
    }


def cohort(arm_counts, month=12):
    """Rows and allocation with the given (responders, n) per arm, all assessed.

    Responders are partial involution, the others no change.
    """
    rows, allocation = [], {}
    for arm, (responders, n) in arm_counts.items():
        for i in range(n):
            pid = f"sub-{arm}{i:03d}"
            allocation[pid] = arm
            rows.append(response_row(pid, month, PARTIAL if i < responders else NO_CHANGE))
    return rows, allocation


def row_of(rows, endpoint, month=12):
    (row,) = [r for r in rows if r["endpoint"] == endpoint and r["month"] == month]
    return row


def wilson(k, n):
    """Wilson score interval from scipy (a library independent of statsmodels)."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def woolf(a, b, c, d):
    """Odds ratio and Woolf 95% CI from the formula."""
    log_or = math.log(a * d / (b * c))
    se = math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    return math.exp(log_or), math.exp(log_or - Z95 * se), math.exp(log_or + Z95 * se)


def fisher_two_sided(a, b, c, d):
    """Two-sided Fisher p by exact hypergeometric sums (probabilities <= observed)."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x):
        return math.comb(row1, x) * math.comb(n - row1, col1 - x) / math.comb(n, col1)

    observed = prob(a)
    support = range(max(0, row1 + col1 - n), min(row1, col1) + 1)
    return sum(prob(x) for x in support if prob(x) <= observed * (1 + 1e-7))


# ---------------------------------------------------------------- known answers


def test_ten_of_twenty_vs_four_of_twenty():
    rows, allocation = cohort({"SP": (10, 20), "S": (4, 20)})
    row = row_of(response_by_arm(rows, allocation, ["SP", "S"], [6, 12, 24]), "overall_response")
    assert (row["arm_1"], row["n_1"], row["responders_1"]) == ("SP", 20, 10)
    assert (row["arm_2"], row["n_2"], row["responders_2"]) == ("S", 20, 4)
    assert row["rate_1_pct"] == pytest.approx(50.0)
    assert row["rate_2_pct"] == pytest.approx(20.0)
    assert row["difference_pct"] == pytest.approx(30.0)
    # Newcombe: statsmodels called here, and square-and-add of scipy's Wilson intervals.
    low, high = confint_proportions_2indep(10, 20, 4, 20, method="newcomb", compare="diff")
    assert row["difference_ci_low_pct"] == pytest.approx(100 * low, abs=1e-9)
    assert row["difference_ci_high_pct"] == pytest.approx(100 * high, abs=1e-9)
    (l1, u1), (l2, u2) = wilson(10, 20), wilson(4, 20)
    assert row["difference_ci_low_pct"] == pytest.approx(100 * (0.3 - math.hypot(0.5 - l1, u2 - 0.2)), abs=1e-6)
    assert row["difference_ci_high_pct"] == pytest.approx(100 * (0.3 + math.hypot(u1 - 0.5, 0.2 - l2)), abs=1e-6)
    # Woolf by the formula: a=10, b=10, c=4, d=16.
    odds_ratio, or_low, or_high = woolf(10, 10, 4, 16)
    assert row["odds_ratio"] == pytest.approx(4.0) == pytest.approx(odds_ratio)
    assert row["odds_ratio_ci_low"] == pytest.approx(or_low, rel=1e-9)
    assert row["odds_ratio_ci_high"] == pytest.approx(or_high, rel=1e-9)
    assert row["fisher_p"] == pytest.approx(stats.fisher_exact([[10, 10], [4, 16]]).pvalue, rel=1e-12)
    assert row["fisher_p"] == pytest.approx(fisher_two_sided(10, 10, 4, 16), rel=1e-9)
    assert "method" not in row and row["note"] is None  # the methods are in the data dictionary


@pytest.mark.parametrize(
    "counts, published",
    [
        # Newcombe RG (1998) Stat Med 17:873-890, Table II, method 10 (hybrid score, no
        # continuity correction): (a) 56/70 vs 48/80, (b) 9/10 vs 3/10.
        ((56, 70, 48, 80), (20.00, 5.24, 33.39)),
        ((9, 10, 3, 10), (60.00, 17.05, 80.90)),
    ],
)
def test_newcombe_published_examples(counts, published):
    out = compare_two_arms(*counts)
    estimate, low, high = published
    assert out["difference_pct"] == pytest.approx(estimate, abs=1e-9)
    assert out["difference_ci_low_pct"] == pytest.approx(low, abs=0.005)
    assert out["difference_ci_high_pct"] == pytest.approx(high, abs=0.005)


def test_arm_order_sets_the_direction():
    """Experimental (first) minus control: swapping arms flips the difference, inverts the OR."""
    forward, backward = compare_two_arms(10, 20, 4, 20), compare_two_arms(4, 20, 10, 20)
    assert backward["difference_pct"] == pytest.approx(-forward["difference_pct"])
    assert backward["difference_ci_low_pct"] == pytest.approx(-forward["difference_ci_high_pct"])
    assert backward["odds_ratio"] == pytest.approx(1 / forward["odds_ratio"])
    assert backward["odds_ratio_ci_high"] == pytest.approx(1 / forward["odds_ratio_ci_low"])
    assert backward["fisher_p"] == pytest.approx(forward["fisher_p"])


# ---------------------------------------------------------------- zero cells


def test_zero_cell_adds_half_to_every_cell():
    out = compare_two_arms(0, 20, 4, 20)
    odds_ratio, low, high = woolf(0.5, 20.5, 4.5, 16.5)
    assert out["odds_ratio"] == pytest.approx(odds_ratio, rel=1e-9)
    assert (out["odds_ratio_ci_low"], out["odds_ratio_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    # The same as statsmodels' Gart-adjusted logit interval (0.5 added to each cell).
    adj = confint_proportions_2indep(0, 20, 4, 20, method="logit-adjusted", compare="odds-ratio")
    assert (out["odds_ratio_ci_low"], out["odds_ratio_ci_high"]) == pytest.approx(adj, rel=1e-9)
    assert "adding 0.5 to all four cells (Haldane-Anscombe)" in out["note"] and "method" not in out
    # Difference and Fisher p use the uncorrected counts.
    assert out["difference_pct"] == pytest.approx(-20.0)
    assert out["fisher_p"] == pytest.approx(stats.fisher_exact([[0, 20], [4, 16]]).pvalue)


@pytest.mark.parametrize("counts, why", [((0, 12, 0, 9), "no responders"), ((12, 12, 9, 9), "every participant")])
def test_odds_ratio_not_estimable_without_information(counts, why):
    out = compare_two_arms(*counts)
    assert out["odds_ratio"] is None and out["odds_ratio_ci_low"] is None and out["odds_ratio_ci_high"] is None
    assert why in out["note"]
    assert out["fisher_p"] == pytest.approx(1.0)
    assert out["difference_pct"] == pytest.approx(0.0)
    low, high = confint_proportions_2indep(*counts, method="newcomb", compare="diff")
    assert (out["difference_ci_low_pct"], out["difference_ci_high_pct"]) == pytest.approx((100 * low, 100 * high))


def test_empty_arm_has_no_comparison():
    rows, allocation = cohort({"SP": (3, 5)})
    row = row_of(response_by_arm(rows, allocation, ["SP", "S"], [12]), "overall_response")
    assert row["n_2"] == 0 and row["rate_2_pct"] is None
    assert row["difference_pct"] is None and row["fisher_p"] is None
    assert "no allocated participants" in row["note"]


# ---------------------------------------------------------------- intention to treat


def itt_cohort():
    rows = [
        response_row("sub-01", 12, COMPLETE),
        response_row("sub-02", 12, PARTIAL),
        response_row("sub-03", 12, "n/a", status="error"),  # pending read / failed series
        response_row("sub-04", 12, GROWTH),
        response_row("sub-05", 12, NEARLY_COMPLETE),
        response_row("sub-99", 12, COMPLETE),  # imaging, not allocated: not counted
        response_row("sub-01", 6, PARTIAL),
    ]
    # sub-06 is allocated but has no imaging at all.
    allocation = {"sub-01": "SP", "sub-02": "SP", "sub-03": "SP", "sub-04": "S", "sub-05": "S", "sub-06": "S"}
    return rows, allocation


def test_itt_missing_and_unusable_follow_ups_are_non_responders():
    rows, allocation = itt_cohort()
    out = response_by_arm(rows, allocation, ["SP", "S"], [6, 12])
    overall, good = row_of(out, "overall_response"), row_of(out, "good_response")
    assert (overall["n_1"], overall["responders_1"]) == (3, 2)  # sub-03's error row: non-responder
    assert (overall["n_2"], overall["responders_2"]) == (3, 1)  # sub-06 without imaging, sub-99 not counted
    assert (good["responders_1"], good["responders_2"]) == (1, 1)
    assert row_of(out, "category:not_assessed")["responders_1"] == 1
    assert row_of(out, "category:not_assessed")["responders_2"] == 1
    at_6 = row_of(out, "overall_response", month=6)
    assert (at_6["n_1"], at_6["responders_1"], at_6["n_2"], at_6["responders_2"]) == (3, 1, 3, 0)
    assert row_of(out, "category:not_assessed", month=6)["responders_1"] == 2


def test_a_missing_visit_row_is_not_assessed():
    """A status=missing row (an expected visit with no series, khe_vol.tables) counts as not assessed."""
    rows = [response_row("sub-01", 12, "n/a", status="missing"), response_row("sub-02", 12, "growth")]
    categories = categories_by_month(rows, ["sub-01", "sub-02"], [12])
    assert categories[12] == {"sub-01": NOT_ASSESSED, "sub-02": "growth"}


def test_a_pending_row_with_a_stale_category_is_not_counted():
    """Only status=ok rows count, whatever the category column says."""
    rows = [dict(response_row("sub-01", 12, PARTIAL), status="error")]
    out = response_by_arm(rows, {"sub-01": "SP", "sub-02": "S"}, ["SP", "S"], [12])
    assert row_of(out, "overall_response")["responders_1"] == 0
    assert row_of(out, "category:not_assessed")["responders_1"] == 1


def test_category_counts_add_up_to_n_per_arm():
    rows, allocation = itt_cohort()
    out = response_by_arm(rows, allocation, ["SP", "S"], [6, 12])
    for month in (6, 12):
        cats = [row_of(out, f"category:{c}", month) for c in ARM_CATEGORIES]
        for i in (1, 2):
            assert sum(r[f"responders_{i}"] for r in cats) == cats[0][f"n_{i}"] == 3
            assert sum(r[f"rate_{i}_pct"] for r in cats) == pytest.approx(100.0)
    assert set(ARM_CATEGORIES) == {*CATEGORIES, NOT_ASSESSED}


def test_two_rows_at_one_month_is_an_error():
    rows = [response_row("sub-01", 12, PARTIAL), response_row("sub-01", 12, GROWTH)]
    with pytest.raises(ValueError, match="sub-01 has two response rows at month 12"):
        response_by_arm(rows, {"sub-01": "SP"}, ["SP", "S"], [12])


# ---------------------------------------------------------------- months and arms


def test_primary_month_first_and_flagged():
    rows, allocation = itt_cohort()
    out = response_by_arm(rows, allocation, ["SP", "S"], [0, 24, 6, 12], primary_month=12)
    months = list(dict.fromkeys(r["month"] for r in out))
    assert months == [12, 6, 24]  # baseline dropped
    assert all(r["primary"] == int(r["month"] == 12) for r in out)
    assert [r["endpoint"] for r in out[:2]] == ["overall_response", "good_response"]
    assert len(out) == 3 * (2 + len(ARM_CATEGORIES))
    with pytest.raises(ValueError, match="primary_month 36 is not a follow-up month"):
        response_by_arm(rows, allocation, ["SP", "S"], [6, 12], primary_month=36)


def test_other_arm_counts_give_per_arm_rows_only():
    rows, allocation = itt_cohort()
    allocation["sub-06"] = "X"
    out = response_by_arm(rows, allocation, ["SP", "S", "X"], [12])
    overall = [r for r in out if r["endpoint"] == "overall_response"]
    assert [(r["arm_1"], r["n_1"], r["responders_1"]) for r in overall] == [("SP", 3, 2), ("S", 2, 1), ("X", 1, 0)]
    assert all("arm_2" not in r and r.get("difference_pct") is None for r in out)
    assert all("exactly 2 arms (3 configured)" in r["note"] for r in out)


def test_allocated_arm_must_be_configured():
    with pytest.raises(ValueError, match="arm\\(s\\) Z not in the configured arms"):
        response_by_arm([], {"sub-01": "Z"}, ["SP", "S"], [12])


# ---------------------------------------------------------------- allocation file


def write_tsv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_allocation_itt_and_warnings(tmp_path):
    path = write_tsv(tmp_path / "alloc.tsv", "\ufeffparticipant_id\tarm\tsite\nsub-01\tSP\tA\nsub-02\tS\tB\nsub-03\tS\tA\n")
    allocation, warnings = read_allocation(path, known_participants={"sub-01", "sub-02", "sub-99"}, arms=["SP", "S"])
    assert allocation == {"sub-01": "SP", "sub-02": "S", "sub-03": "S"}
    assert len(warnings) == 2
    assert "sub-99 has imaging but is not in the allocation" in warnings[0]
    assert "sub-03 is allocated but has no imaging" in warnings[1]
    assert all(str(path) in w for w in warnings)


def test_read_allocation_saved_as_utf16_by_a_spreadsheet(tmp_path):
    path = tmp_path / "alloc.tsv"
    path.write_bytes("participant_id\tarm\r\nsub-01\tSP\r\nsub-02\tS\r\n".encode("utf-16"))
    allocation, _ = read_allocation(path, arms=["SP", "S"])
    assert allocation == {"sub-01": "SP", "sub-02": "S"}
    path.write_bytes("participant_id\tarm\tsite\nsub-01\tSP\tK\u00f6ln\n".encode("cp1252"))
    with pytest.raises(ValueError, match=f"{path}.*not UTF-8"):
        read_allocation(path, arms=["SP", "S"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("participant_id\tarm\n", "no participants"),
        ("participant_id\tgroup\nsub-01\tSP\n", "missing column\\(s\\) arm"),
        ("participant_id\tarm\nsub-01\tSP\nsub-02\tS\nsub-01\tS\n", "line 4: sub-01 is allocated twice \\(first at line 2\\)"),
        ("participant_id\tarm\nsub-01\tSP\nsub-02\tplacebo\n", "line 3: arm 'placebo' of sub-02 is not one of the configured arms \\(SP, S\\)"),
        ("participant_id\tarm\n01\tSP\n", "line 2: participant_id '01' is not sub-<label>"),
        ("participant_id\tarm\nsub-01\t\n", "line 2: sub-01 has no arm"),
    ],
)
def test_read_allocation_errors_name_file_and_line(tmp_path, text, message):
    path = write_tsv(tmp_path / "alloc.tsv", text)
    with pytest.raises(ValueError, match=message) as info:
        read_allocation(path, arms=["SP", "S"])
    assert str(path) in str(info.value)


def test_allocation_mismatches_are_in_every_rows_note_and_the_dictionary(tmp_path):
    import subprocess
    import sys

    volumes = write_tsv(tmp_path / "volumes.tsv", "participant_id\tsession_id\nsub-01\tses-baseline\nsub-02\tses-baseline\n"
                        "sub-09\tses-baseline\n")
    response = write_tsv(tmp_path / "response.tsv", "participant_id\tsession_id\tmonth\tcategory\tstatus\n"
                         "sub-01\tses-m12\t12\tpartial_involution\tok\nsub-02\tses-m12\t12\tno_change\tok\n"
                         "sub-09\tses-m12\t12\tpartial_involution\tok\n")
    allocation = write_tsv(tmp_path / "alloc.tsv", "participant_id\tarm\nsub-01\tSP\nsub-02\tS\nsub-03\tS\n")
    out = tmp_path / "response_by_arm.tsv"
    proc = subprocess.run([sys.executable, "-m", "khe_vol.cli", "arms", "--response", str(response), "--volumes", str(volumes),
                           "--allocation", str(allocation), "--arm", "SP", "--arm", "S", "--month", "12", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    for row in table:
        assert "allocated but never imaged (counted as not_assessed, a non-responder): sub-03" in row["note"], row
        assert "imaged but not allocated (not counted): sub-09" in row["note"], row
    # the comparison's own note is kept beside it
    assert "descriptive" in next(r for r in table if r["endpoint"] == "category:growth")["note"]
    dictionary = json.loads(out.with_suffix(".json").read_text())
    mismatches = dictionary["Provenance"]["AllocationMismatches"]
    assert any("sub-03" in m for m in mismatches) and any("sub-09" in m for m in mismatches)
    assert "allocation" in dictionary["note"]["Description"]


# ---------------------------------------------------------------- output


def test_write_rounds_once_and_documents_every_column(tmp_path):
    rows, allocation = itt_cohort()
    out = response_by_arm(rows, allocation, ["SP", "S"], [6, 12])
    path = tmp_path / "response_by_arm.tsv"
    write_response_by_arm(path, out)
    with open(path, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    dictionary = json.loads((tmp_path / "response_by_arm.json").read_text())
    assert list(table[0]) == list(dictionary) == list(ARM_COLUMNS)
    assert all(entry["LongName"] and entry["Description"] for entry in dictionary.values())
    assert set(dictionary["endpoint"]["Levels"]) == {r["endpoint"] for r in table}
    first = table[0]
    assert (first["endpoint"], first["month"], first["primary"]) == ("overall_response", "12", "1")
    assert (first["n_1"], first["responders_1"], first["rate_1_pct"]) == ("3", "2", "66.67")
    assert first["difference_pct"] == format(out[0]["difference_pct"], ".2f") == "33.33"
    assert first["fisher_p"] == format(out[0]["fisher_p"], ".4g")
    growth = next(r for r in table if r["endpoint"] == "category:growth" and r["month"] == "6")
    assert growth["responders_1"] == "0" and growth["rate_1_pct"] == "0.00"  # zero is not n/a
    assert growth["difference_pct"] == "n/a"
    # How each value is computed is said once, in the dictionary, not as a column on every row.
    assert "method" not in first
    assert "confint_proportions_2indep(method='newcomb'" in dictionary["difference_ci_low_pct"]["Description"]
    assert "Table2x2" in dictionary["odds_ratio"]["Description"]
    assert "fisher_exact" in dictionary["fisher_p"]["Description"]


def test_by_arm_page_states_the_methods_once_from_the_dictionary(tmp_path):
    from khe_vol.files import read_tsv
    from khe_vol.report.pages import by_arm_page

    rows, allocation = itt_cohort()
    path = tmp_path / "response_by_arm.tsv"
    write_response_by_arm(path, response_by_arm(rows, allocation, ["SP", "S"], [6, 12]))
    page = by_arm_page(read_tsv(path))
    assert page.count("<h2>Methods</h2>") == 1
    assert page.count("confint_proportions_2indep") == 1 and page.count("fisher_exact") == 1
