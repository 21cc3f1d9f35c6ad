"""Longitudinal reading and time per read: packages, audit, and the reader app in real Chromium.

The cohort (:func:`tests.qa_cohort.write_cohort`) has sub-01 at baseline on a
RAS grid and at m06 on a permuted, flipped grid (other axes, other field of
view): a crosshair linked by voxel index or fraction would land elsewhere.
"""

from __future__ import annotations

import json
import re
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from khe_vol.cli import main
from khe_vol.files import read_tsv
from khe_vol.qa import store
from khe_vol.qa.agreement import reader_time_rows
from khe_vol.qa.audit import worklist_problems
from khe_vol.qa.leaks import DATE_RE
from khe_vol.qa.key import read_key
from tests.qa_cohort import write_cohort
from tests.test_qa_app import draw_stroke, reader_browser, wait_status

SEED = "987654321987"


def build(tmp_path, mode=None, readers=("R1",)):
    records = write_cohort(tmp_path)
    results = tmp_path / "results"
    args = ["qa", "package", "--results-dir", str(results), "--seed", SEED]
    for r in readers:
        args += ["--reader", r]
    if mode:
        args += ["--reading-mode", mode]
    assert main([*args, *map(str, records)]) == 0
    key = {(r["reader"], r["participant_id"], r["session_id"]): r for r in read_key(results)}
    return results, records, key


def worklist(results, reader="R1"):
    return json.loads((results / "qa" / reader / "worklist.json").read_text())


def test_longitudinal_package_groups_timepoints_in_time_order(tmp_path):
    results, _, key = build(tmp_path, "longitudinal", readers=("R1", "R2"))
    wl = worklist(results)
    base, follow, other = (key[("R1", p, s)] for p, s in [
        ("sub-01", "ses-baseline"), ("sub-01", "ses-m06"), ("sub-02", "ses-baseline")])
    by_code = {c["case_code"]: c for c in wl["cases"]}
    assert wl["reading_mode"] == "longitudinal"
    groups = {g["participant"]: g["cases"] for g in wl["participants"]}
    assert groups == {base["participant_code"]: [base["case_code"], follow["case_code"]],
                      other["participant_code"]: [other["case_code"]]}
    assert base["participant_code"] != other["participant_code"]
    assert re.fullmatch(r"P-[A-Z][0-9A-Z]{5}", base["participant_code"])
    assert (by_code[base["case_code"]]["timepoint"], by_code[base["case_code"]]["prior_case"]) == (1, None)
    assert (by_code[follow["case_code"]]["timepoint"], by_code[follow["case_code"]]["prior_case"]) == (
        2, base["case_code"])
    assert [base["timepoint"], follow["timepoint"], other["timepoint"]] == ["1", "2", "1"]
    # A participant's timepoints are next to each other in the worklist, in time order.
    positions = [by_code[c]["position"] for c in groups[base["participant_code"]]]
    assert positions[1] == positions[0] + 1
    # Another reader gets other codes for the same participant (their lists cannot be lined up).
    assert key[("R2", "sub-01", "ses-baseline")]["participant_code"] != base["participant_code"]
    # Nothing but the order: no month, session, date.
    text = (results / "qa" / "R1" / "worklist.json").read_text()
    assert not re.search(r"month|ses-|baseline|m06|sub-", text) and not DATE_RE.search(text)
    assert worklist_problems(wl, "wl") == []
    assert main(["qa", "audit", "--results-dir", str(results)]) == 0


def test_independent_package_carries_no_grouping(tmp_path):
    results, _, key = build(tmp_path)
    wl = worklist(results)
    assert "participants" not in wl and "reading_mode" not in wl
    assert all(not {"participant", "timepoint", "n_timepoints", "prior_case"} & set(c) for c in wl["cases"])
    assert all(r["participant_code"] is None and r["timepoint"] is None for r in key.values())
    assert worklist_problems(wl, "wl") == []


def test_audit_refuses_worklist_fields_it_does_not_know_and_a_grouping_that_says_more(tmp_path):
    results, _, _ = build(tmp_path, "longitudinal")
    path = results / "qa" / "R1" / "worklist.json"
    good = worklist(results)
    # A month is a short number the token scan cannot find: the field itself is refused.
    with_month = json.loads(json.dumps(good))
    with_month["cases"][0]["month"] = 6
    # A timepoint that skips (T1, T3) tells an interval; a prior that is not T1 another order.
    skipping = json.loads(json.dumps(good))
    two = next(g for g in skipping["participants"] if len(g["cases"]) == 2)
    next(c for c in skipping["cases"] if c["case_code"] == two["cases"][1])["timepoint"] = 3
    independent = json.loads(json.dumps(good))
    del independent["reading_mode"], independent["participants"]
    for bad, words in [(with_month, "month"), (skipping, "timepoint"), (independent, "participant")]:
        assert any(words in p for p in worklist_problems(bad, "wl")), (words, worklist_problems(bad, "wl"))
        path.write_text(json.dumps(bad))
        assert main(["qa", "audit", "--results-dir", str(results)]) == 1


def test_read_times_summary_per_reader(tmp_path):
    db = tmp_path / "R1.sqlite"
    for code, seconds in [("A", 10.0), ("B", 20.0), ("C", 30.0), ("D", 40.0)]:
        store.record_read(db, "R1", code, "accept", seconds_to_verdict=seconds)
    store.record_read(db, "R1", "E", "edited", edited_mask=b"m", seconds_to_verdict=100.0, edit_seconds=60.0)
    store.record_read(db, "R1", "A", "reject", seconds_to_verdict=5.0)  # a revision: the case took 15 s
    store.record_read(db, "R1", "F", "accept")  # no time (an older client)
    (row,) = reader_time_rows(store.all_reads(db), ["R1"])
    assert row["n_reads"] == 6 and row["n_timed"] == 5 and row["n_edited"] == 1
    assert row["median_seconds"] == pytest.approx(30.0)  # 15, 20, 30, 40, 100
    assert row["p90_seconds"] == pytest.approx(np.percentile([15, 20, 30, 40, 100], 90))
    assert row["share_accepted_without_edit"] == pytest.approx(4 / 6)  # B, C, D, F
    assert row["median_edit_seconds"] == pytest.approx(60.0)
    assert "1 case(s) without a time" in row["note"]
    (empty,) = reader_time_rows([], ["R2"])
    assert empty["n_reads"] == 0 and empty["median_seconds"] is None and empty["note"] == "no reads"


def mm_of(page, which):
    """RAS+ mm of a pane's crosshair, through its series' own voxel-to-world transform."""
    return np.array(page.evaluate(
        """(w) => { const v = w === 'prior' ? window.kheCompare.prior : window.khe.nv;
                    return Array.from(v.frac2mm(v.scene.crosshairPos, 0, true)).slice(0, 3); }""", which))


def wait_linked(page):
    page.wait_for_function(
        """() => { const a = window.khe.nv, b = window.kheCompare.prior;
                   const m = Array.from(a.frac2mm(a.scene.crosshairPos, 0, true));
                   const n = Array.from(b.frac2mm(b.scene.crosshairPos, 0, true));
                   return [0, 1, 2].every((i) => Math.abs(m[i] - n[i]) < 1e-3); }""", timeout=10000)


def click_canvas(page, canvas, fx, fy):
    box = page.locator(canvas).bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def open_case(page, base, code):
    page.goto(f"{base}/case/{code}")
    page.wait_for_selector("body[data-ready='1']", timeout=30000)


@pytest.mark.slow  # a real browser
def test_longitudinal_reading_in_a_real_browser(tmp_path):
    results, _, key = build(tmp_path, "longitudinal")
    base_code = key[("R1", "sub-01", "ses-baseline")]["case_code"]
    follow_code = key[("R1", "sub-01", "ses-m06")]["case_code"]
    pcode = key[("R1", "sub-01", "ses-baseline")]["participant_code"]
    db = results / "reads" / "R1.sqlite"
    with reader_browser(results, tmp_path) as served:
        page, base = served.page, served.base
        page.goto(base + "/")
        groups = page.locator("tbody.participant")
        assert groups.count() == 2
        group = page.locator(f"tbody.participant[data-participant='{pcode}']")
        assert group.locator("td.timepoint").all_inner_texts() == ["T1", "T2"]
        assert group.locator("a").all_inner_texts() == [base_code, follow_code]
        text = page.inner_text("body")
        assert not re.search(r"ses-|sub-|baseline|m06|month", text, re.IGNORECASE) and not DATE_RE.search(text)

        # T1: no earlier scan to show. Read it (accept) after a moment: the time goes with the read.
        open_case(page, base, base_code)
        page.wait_for_selector("body[data-compare-ready='1']")
        assert page.inner_text("#timepoint").startswith(f"Participant {pcode}: T1 of 2")
        assert page.locator("#prior-pane").count() == 0
        time.sleep(1.5)
        page.click("button.verdict[data-verdict='accept']")
        wait_status(page, "Current: Accept")

        # T2: T1 and its final mask beside it.
        open_case(page, base, follow_code)
        page.wait_for_selector("body[data-compare-ready='1']", timeout=30000)
        assert page.inner_text("#timepoint").startswith(f"Participant {pcode}: T2 of 2")
        assert "proposed mask (you accepted it)" in page.inner_text("#prior-caption")
        assert any(u.endswith(f"/files/{base_code}_t2.nii.gz") for u in served.urls)
        assert any(u.endswith(f"/files/{base_code}_mask.nii.gz") for u in served.urls)
        page.click("button[data-slice='0']")  # axial, in both panes
        page.wait_for_function("() => window.kheCompare.prior.opts.sliceType === 0")
        # The case's display boxes hold for T1's pane too: X and M hide the crosshair and mask in both.
        prior_display = "() => [window.kheCompare.prior.opts.crosshairWidth, window.kheCompare.prior.drawOpacity]"
        assert page.evaluate(prior_display) == pytest.approx(
            page.evaluate("() => [window.khe.nv.opts.crosshairWidth, window.khe.nv.drawOpacity]"))
        assert page.evaluate(prior_display) == pytest.approx([0.3, 0.5])
        for key in ("x", "m"):
            page.keyboard.press(key)
        page.wait_for_function(f"() => ({prior_display})().every((v) => v === 0)")
        for key in ("x", "m"):
            page.keyboard.press(key)
        page.wait_for_function(f"() => ({prior_display})()[0] === 0.3 && ({prior_display})()[1] === 0.5")

        # A click in this case's pane moves T1's crosshair to the same physical point ...
        affine_t2 = nib.load(results / "qa" / "R1" / f"{follow_code}_t2.nii.gz").affine
        affine_t1 = nib.load(results / "qa" / "R1" / f"{base_code}_t2.nii.gz").affine
        index_link_error_mm = []
        for fx, fy in [(0.42, 0.3), (0.58, 0.7)]:
            click_canvas(page, "#gl", fx, fy)
            wait_linked(page)
            here, there = mm_of(page, "main"), mm_of(page, "prior")
            assert np.allclose(here, there, atol=1e-3), (here, there)
            # The same voxel index on T1's grid (other axes, flipped) would be somewhere else.
            ijk = np.linalg.solve(affine_t2, np.r_[here, 1.0])[:3]
            assert np.all((ijk > -0.5) & (ijk < np.array([32, 28, 10]) - 0.5)), ijk  # clicked inside the image
            index_link_error_mm.append(np.linalg.norm((affine_t1 @ np.r_[ijk, 1.0])[:3] - here))
        assert max(index_link_error_mm) > 5.0, index_link_error_mm
        # And a click in T1's pane drives this case's pane.
        before = mm_of(page, "main")
        click_canvas(page, "#gl-prior", 0.45, 0.5)
        page.wait_for_function(
            """(b) => { const v = window.khe.nv; const m = Array.from(v.frac2mm(v.scene.crosshairPos, 0, true));
                        return Math.hypot(m[0] - b[0], m[1] - b[1], m[2] - b[2]) > 0.5; }""", arg=before.tolist())
        wait_linked(page)
        assert np.allclose(mm_of(page, "main"), mm_of(page, "prior"), atol=1e-3)

        # Zoom (buttons) and window/level (a right-button drag, as a reader does) follow.
        zoom = page.evaluate("() => window.khe.nv.scene.pan2Dxyzmm[3]")
        page.click("#zoom-in")
        page.wait_for_function("(z) => Math.abs(window.kheCompare.prior.scene.pan2Dxyzmm[3] - 1.25 * z) < 1e-6",
                               arg=zoom)
        # Both panes show the same point in their middle (scanner mm, through each series' own transform).
        centres = page.evaluate("""() => [window.kheCompare.viewCentreWorld(window.khe.nv),
                                          window.kheCompare.viewCentreWorld(window.kheCompare.prior)]""")
        assert np.allclose(centres[0], centres[1], atol=1e-3), centres
        levels_before = page.evaluate("() => [window.khe.nv.volumes[0].cal_min, window.khe.nv.volumes[0].cal_max]")
        box = page.locator("#gl").bounding_box()
        page.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + 0.3 * box["height"])
        page.mouse.down(button="right")
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.6 * box["height"], steps=8)
        page.mouse.up(button="right")
        page.wait_for_function(
            "(b) => window.khe.nv.volumes[0].cal_min !== b[0] || window.khe.nv.volumes[0].cal_max !== b[1]",
            arg=levels_before)
        page.wait_for_timeout(300)
        levels = page.evaluate("""() => [window.khe.nv.volumes[0], window.kheCompare.prior.volumes[0]].map(
            (v) => [v.cal_min, v.cal_max])""")
        (lo, hi), (plo, phi) = levels
        (rlo, rhi), (prlo, prhi) = (_api_case(results, follow_code, db)["image_info"]["windows"]["auto"],
                                    _api_case(results, follow_code, db)["longitudinal"]["prior"]["windows"]["auto"])
        # The same place between each series' own robust window (the server's "auto" preset).
        assert (plo - prlo) / (prhi - prlo) == pytest.approx((lo - rlo) / (rhi - rlo), abs=1e-4)
        assert (phi - prlo) / (prhi - prlo) == pytest.approx((hi - rlo) / (rhi - rlo), abs=1e-4)

        # The native plane box holds for both panes (both resliced along the scanner axes, then back).
        for native in (False, True):
            page.click("#native-plane")
            page.wait_for_function("(m) => window.kheCompare.prior.opts.isSliceMM === m", arg=not native)
            wait_linked(page)

        # An edited read of T2 is timed, with its edit time.
        draw_stroke(page)
        time.sleep(0.5)
        page.click("#save-edit")
        wait_status(page, "Current: Edited")
        page.screenshot(path=str(tmp_path / "longitudinal.png"))
    assert not served.errors, served.errors

    reads = {r["case_code"]: r for r in store.all_reads(db)}
    assert reads[base_code]["seconds_to_verdict"] >= 1.5 and reads[base_code]["edit_seconds"] is None
    follow = reads[follow_code]
    assert 0.5 <= follow["edit_seconds"] <= follow["seconds_to_verdict"] < 600
    (row,) = reader_time_rows(store.all_reads(db), ["R1"])
    assert (row["n_reads"], row["n_timed"], row["n_edited"], row["share_accepted_without_edit"]) == (2, 2, 1, 0.5)
    assert row["median_edit_seconds"] == pytest.approx(follow["edit_seconds"])
    # Read times are never shown to a reader: not in the page's data.
    assert "seconds" not in json.dumps(_api_case(results, follow_code, db))

    # `khe-vol qa reader-times` (the workflow's qa_reader_times rule) writes the table from the real store.
    out = tmp_path / "qa_reader_times.tsv"
    assert main(["qa", "reader-times", "--results-dir", str(results), "--reader", "R1", "--reader", "R2",
                 "--out", str(out)]) == 0
    table, other = read_tsv(out)
    assert (table["reader"], table["n_reads"], table["n_edited"], table["share_accepted_without_edit"]) == (
        "R1", "2", "1", "0.500")
    assert (other["reader"], other["n_reads"], other["median_seconds"]) == ("R2", "0", "n/a")
    assert float(table["median_seconds"]) == pytest.approx(
        np.median([reads[base_code]["seconds_to_verdict"], follow["seconds_to_verdict"]]), abs=0.051)
    assert json.loads(out.with_suffix(".json").read_text())["p90_seconds"]["Units"] == "s"
    assert main(["qa", "audit", "--results-dir", str(results)]) == 0


def _api_case(results, code, db):
    from khe_vol.qa.app import create_app

    client = create_app(results, "R1", db_path=db, check_viewer=False).test_client()
    return client.get(f"/api/case/{code}", headers={"Host": "127.0.0.1"}).json


@pytest.mark.slow  # a real browser
def test_independent_reading_shows_no_grouping_and_no_prior(tmp_path):
    results, _, key = build(tmp_path)
    follow_code = key[("R1", "sub-01", "ses-m06")]["case_code"]
    with reader_browser(results, tmp_path) as served:
        page, base = served.page, served.base
        page.goto(base + "/")
        assert page.locator("table.grouped, tbody.participant").count() == 0
        assert "Participant" not in page.inner_text("body") and "T1" not in page.inner_text("body")
        open_case(page, base, follow_code)
        page.wait_for_timeout(500)
        assert page.locator("#timepoint, #prior-pane, #gl-prior").count() == 0
        assert "longitudinal" not in json.loads(page.evaluate("() => document.getElementById('case-data').textContent"))
        assert not any("compare" in u for u in served.urls)
        page.click("button.verdict[data-verdict='reject']")
        wait_status(page, "Current: Reject")
    assert not served.errors, served.errors
    (read,) = store.all_reads(results / "reads" / "R1.sqlite")
    assert read["seconds_to_verdict"] > 0 and read["edit_seconds"] is None  # timed in either mode


@pytest.mark.slow  # real Snakemake runs
def test_workflow_builds_longitudinal_packages_and_the_reader_times_table(tmp_path):
    from tests.cohort import write_mask_cohort
    from tests.test_workflow import run_snakemake

    config_path = write_mask_cohort(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    config.update(readers=["R1"], qa_seed=8817230998812345, reading_mode="longitudinal")
    config_path.write_text(yaml.safe_dump(config))
    run_snakemake(tmp_path / "work", config_path)
    results = tmp_path / "results"
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")
    wl = worklist(results)
    assert [len(g["cases"]) for g in wl["participants"]] == [3, 3]
    key = {(r["participant_id"], r["session_id"]): r for r in read_key(results)}
    for pid in ("sub-01", "sub-02"):
        assert [key[(pid, f"ses-{s}")]["timepoint"] for s in ("baseline", "m06", "m12")] == ["1", "2", "3"]
    (row,) = read_tsv(results / "qa_reader_times.tsv")
    assert (row["reader"], row["n_reads"], row["median_seconds"]) == ("R1", "0", "n/a")

    # Reads with their times (as the app stores them): the next run summarises them.
    db = results / "reads" / "R1.sqlite"
    for n, ((pid, ses), r) in enumerate(sorted(key.items())):
        store.record_read(db, "R1", r["case_code"], "accept", proposed_mask_sha256=r["proposed_mask_sha256"],
                          seconds_to_verdict=10.0 * (n + 1))
    run_snakemake(tmp_path / "work", config_path)
    (row,) = read_tsv(results / "qa_reader_times.tsv")
    assert (row["n_reads"], row["n_timed"], row["median_seconds"], row["p90_seconds"],
            row["share_accepted_without_edit"]) == ("6", "6", "35.0", "55.0", "1.000")
    assert (results / "blinding" / "audit.txt").read_text().startswith("clean")
    proc = run_snakemake(tmp_path / "work", config_path, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def acquisition_slice_type(affine):
    """NiiVue's slice type across a grid's thickest voxel axis (0 axial, 1 coronal, 2 sagittal)."""
    axes = np.asarray(affine, float)[:3, :3]
    thick = int(np.argmax(np.linalg.norm(axes, axis=0)))
    return {2: 0, 1: 1, 0: 2}[int(np.argmax(np.abs(axes[:, thick])))]


def on_screen(page, viewer, mm):
    """Where a scanner RAS+ mm point is on a pane's canvas, as fractions of its width and height."""
    return page.evaluate(
        """([w, mm]) => { const v = w === 'prior' ? window.kheCompare.prior : window.khe.nv;
                          const p = v.frac2canvasPosWithTile(v.mm2frac(mm, 0, true), v.opts.sliceType).pos;
                          return [p[0] / v.canvas.width, p[1] / v.canvas.height]; }""", [viewer, list(mm)])


@pytest.mark.slow  # a real browser
def test_both_panes_open_on_the_lesion_with_their_own_window_and_the_change_from_t1(tmp_path):
    """Issue 24 (7, 8): a follow-up whose proposal is empty (0 mL) opens on T1's lesion, T1's pane on its own
    lesion with its own window (not mapped from the follow-up's), in each series' acquisition plane; T1's
    volume and the % change of the volume on screen are beside the panes."""
    results, _, key = build(tmp_path, "longitudinal")
    base = key[("R1", "sub-01", "ses-baseline")]
    follow = key[("R1", "sub-01", "ses-m06")]
    folder = results / "qa" / "R1"
    wl = worklist(results)
    case = {c["case_code"]: c for c in wl["cases"]}
    # A 0 mL follow-up: its proposed mask is empty.
    mask_path = folder / case[follow["case_code"]]["proposed_mask"]
    img = nib.load(mask_path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), mask_path)
    base_mask = nib.load(folder / case[base["case_code"]]["proposed_mask"])
    ijk = np.argwhere(np.asarray(base_mask.dataobj) != 0)
    lesion_mm = nib.affines.apply_affine(base_mask.affine, (ijk.min(axis=0) + ijk.max(axis=0)) / 2)
    t1_ml = case[base["case_code"]]["automatic_volume_ml"]
    db = results / "reads" / "R1.sqlite"
    with reader_browser(results, tmp_path) as served:
        page = served.page
        page.set_viewport_size({"width": 1366, "height": 768})
        open_case(page, served.base, follow["case_code"])
        page.wait_for_selector("body[data-compare-ready='1']", timeout=30000)
        page.wait_for_timeout(300)
        # Each pane in its series' acquisition plane; T1's lesion in the middle of both.
        affine_t1 = nib.load(folder / case[base["case_code"]]["image"]).affine
        affine_t2 = nib.load(folder / case[follow["case_code"]]["image"]).affine
        assert page.evaluate("() => window.kheCompare.prior.opts.sliceType") == acquisition_slice_type(affine_t1)
        assert page.evaluate("() => window.khe.nv.opts.sliceType") == acquisition_slice_type(affine_t2)
        for viewer in ("prior", "main"):
            x, y = on_screen(page, viewer, lesion_mm)
            assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1, (viewer, x, y)
        # T1's own window: the server's robust preset of T1, not the follow-up's mapped onto it.
        windows = _api_case(results, follow["case_code"], db)["longitudinal"]["prior"]["windows"]
        prior_cal = page.evaluate("() => [window.kheCompare.prior.volumes[0].cal_min, "
                                  "window.kheCompare.prior.volumes[0].cal_max]")
        assert prior_cal == pytest.approx(windows["auto"], rel=1e-6)
        # T1's volume, and the change of the volume on screen (0 mL now: -100 %).
        assert f"volume {t1_ml:.2f} mL" in page.inner_text("#prior-caption")
        page.wait_for_function("() => window.kheCompare.changePercent !== null")
        assert page.evaluate("() => window.kheCompare.changePercent") == pytest.approx(-100.0)
        assert "0.00 mL" in page.inner_text("#volume-change") and "100.0 % from T1" in page.inner_text("#volume-change")
        # Each pane says where its slice is, in scanner mm.
        assert re.search(r"= -?\d+\.\d mm", page.inner_text("#prior-slice-mm"))
        assert re.search(r"= -?\d+\.\d mm", page.inner_text("#slice-mm"))
    assert not served.errors, served.errors
