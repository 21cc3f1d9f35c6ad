"""Reading a case fast and safely: keyboard, auto-advance, one revision per verdict, loading states,
display conventions, window presets, cached viewer, comment limit.

HTTP-level tests use Flask's test client on a real package; browser tests drive Debian's Chromium
through Playwright (:func:`tests.test_qa_app.reader_browser`).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.qa import COMMENT_MAX_CHARS, store
from khe_vol.qa.app import create_app, display_windows, oblique_degrees
from khe_vol.qa.key import read_key
from tests.qa_cohort import write_cohort

HEADERS = {"X-Khe-Vol": "reader"}


def build_package(root, *extra):
    records = write_cohort(root)
    results = root / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "987654321987",
                 *extra, *map(str, records)]) == 0
    codes = {(r["participant_id"], r["session_id"]): r["case_code"] for r in read_key(results) if r["case_code"]}
    return results, codes


@pytest.fixture
def package(tmp_path):
    return build_package(tmp_path)


@pytest.fixture
def client(package, tmp_path):
    results, codes = package
    app = create_app(results, "R1", db_path=tmp_path / "reads.sqlite")
    return app.test_client(), codes, tmp_path / "reads.sqlite"


def post_read(client, code, verdict, **form):
    return client.post(f"/api/case/{code}/read", data={"verdict": verdict, "comment": "", **form}, headers=HEADERS)


def test_the_same_page_state_saves_one_revision(client):
    client, codes, db = client
    code = codes[("sub-01", "ses-baseline")]
    first = post_read(client, code, "accept", expected_revision="0")
    assert first.status_code == 200 and first.json["revision"] == 1
    # A double click posts the same page state again: refused, nothing stored, the saved state returned.
    again = post_read(client, code, "accept", expected_revision="0")
    assert again.status_code == 409 and again.json["duplicate"] is True
    assert "already saved" in again.json["error"] and again.json["view"]["revision"] == 1
    assert [r["revision"] for r in store.read_history(db, code)] == [1]
    # Revising from the new state is a new revision.
    assert post_read(client, code, "reject", expected_revision="1").status_code == 200
    assert [r["verdict"] for r in store.read_history(db, code)] == ["accept", "reject"]
    assert post_read(client, code, "accept", expected_revision="x").status_code == 400


def test_store_refuses_an_unexpected_revision(tmp_path):
    db = tmp_path / "r.sqlite"
    store.record_read(db, "R1", "c1", "accept", expected_revision=0)
    with pytest.raises(store.RevisionConflict, match="revision 1, not 0"):
        store.record_read(db, "R1", "c1", "accept", expected_revision=0)
    assert len(store.read_history(db, "c1")) == 1


def test_a_too_long_comment_is_refused_not_cut(client):
    client, codes, db = client
    code = codes[("sub-01", "ses-baseline")]
    resp = post_read(client, code, "accept", comment="x" * (COMMENT_MAX_CHARS + 7))
    assert resp.status_code == 400 and f"at most {COMMENT_MAX_CHARS}" in resp.json["error"] and "by 7" in resp.json["error"]
    assert store.read_history(db, code) == []
    assert post_read(client, code, "accept", comment="y" * COMMENT_MAX_CHARS).status_code == 200
    assert store.read_history(db, code)[0]["comment"] == "y" * COMMENT_MAX_CHARS


def test_viewer_script_is_versioned_and_cached(client):
    client, codes, _ = client
    page = client.get(f"/case/{codes[('sub-01', 'ses-baseline')]}").get_data(as_text=True)
    (url,) = [part.split('"')[0] for part in page.split('src="')[1:] if part.startswith("/vendor/niivue.umd.js")]
    assert "?v=" in url
    resp = client.get(url)
    assert resp.status_code == 200 and "immutable" in resp.headers["Cache-Control"]
    assert "max-age=31536000" in resp.headers["Cache-Control"] and resp.headers["ETag"]
    # Revalidation of an older URL costs no body.
    again = client.get("/vendor/niivue.umd.js?v=old", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status_code == 304 and again.headers["Cache-Control"] == "no-cache"
    # Everything else stays uncached (a reader's case data).
    assert client.get("/").headers["Cache-Control"] == "no-store"


def test_next_unread_and_case_view(client):
    client, codes, _ = client
    order = [r["case"]["case_code"] for r in client.get("/api/worklist").json["rows"]]
    view = client.get(f"/api/case/{order[0]}").json
    assert view["next_unread"] == order[1] and view["revision"] == 0 and view["n_cases"] == 3
    assert view["display"] == {"radiological": True} and view["comment_max_chars"] == COMMENT_MAX_CHARS
    post_read(client, order[1], "accept" if order[1] == codes[("sub-01", "ses-baseline")] else "reject")
    assert client.get(f"/api/case/{order[0]}").json["next_unread"] == order[2]
    # Wraps round to an earlier unread case; none left: None.
    assert client.get(f"/api/case/{order[2]}").json["next_unread"] == order[0]
    post_read(client, order[0], "reject")
    post_read(client, order[2], "reject")
    assert client.get(f"/api/case/{order[2]}").json["next_unread"] is None
    assert client.get("/api/worklist").json["first_unread"] is None


def test_neurological_convention_from_the_package(tmp_path):
    results, codes = build_package(tmp_path, "--neurological")
    worklist = json.loads((results / "qa" / "R1" / "worklist.json").read_text())
    assert worklist["display"] == {"radiological": False}
    app = create_app(results, "R1", db_path=tmp_path / "reads.sqlite", check_viewer=False)
    assert app.test_client().get(f"/api/case/{codes[('sub-01', 'ses-baseline')]}").json["display"] == {
        "radiological": False}


def test_window_presets_are_robust():
    rng = np.random.default_rng(0)
    data = rng.normal(300, 20, (30, 30, 10))
    data[:5] = 0  # air
    data[15, 15, 5] = 60000  # one saturated voxel (a vessel, an artefact)
    windows = display_windows(data)
    assert windows["full"][1] == 60000
    assert 300 < windows["auto"][1] < 400 and 200 < windows["auto"][0] < 300  # not washed out by the max
    mask = np.zeros(data.shape, bool)
    mask[10:14, 10:14, 3:6] = True
    data[mask] += 400
    lesion = display_windows(data, mask)["lesion"]
    assert lesion[0] == pytest.approx(np.median(data[data != 0]), rel=0.05) and lesion[1] > 650
    # An empty mask (a 0 mL case) falls back to the robust window.
    assert display_windows(data, np.zeros(data.shape, bool))["lesion"] == display_windows(data)["auto"]


def test_oblique_degrees():
    assert oblique_degrees(np.diag([0.5, 0.5, 4, 1])) == pytest.approx(0, abs=1e-9)
    t = np.radians(20)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 0.5, 4])
    assert oblique_degrees(affine) == pytest.approx(20, abs=1e-6)
    # Permuted, flipped axes are not oblique.
    assert oblique_degrees(np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]])) == pytest.approx(0)


# ---------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------

READY = "body[data-ready='1']"


def open_case(page, base, code):
    page.goto(f"{base}/case/{code}")
    page.wait_for_selector(READY, timeout=30000)


def js(page, expression):
    """The value of a function body run in the page (the page's CSP forbids eval of strings)."""
    return page.evaluate(f"() => {{ {expression} }}")


@pytest.mark.slow
def test_keyboard_only_reading_from_open_to_verdict(package, tmp_path):
    from tests.test_qa_app import READER_PASSWORD, SIGN_DIALOG, reader_browser, sign

    results, codes = package
    db = results / "reads" / "R1.sqlite"
    with reader_browser(results, tmp_path, auto_advance=True) as served:
        page, base = served.page, served.base
        page.goto(base + "/")
        order = page.locator("table.worklist a").all_inner_texts()
        open_case(page, base, order[0])
        assert page.evaluate("() => document.activeElement === document.body")  # nothing clicked
        # Slice keys move along the plane shown and the position says where.
        page.keyboard.press("1")  # axial
        before = page.inner_text("#slice-info")
        assert before.startswith("axial slice ") and before.endswith(" / 10")
        k = int(before.split()[2])
        page.keyboard.press("ArrowUp")
        assert page.inner_text("#slice-info") == f"axial slice {k + 1} / 10"
        page.keyboard.press("PageDown")
        assert page.inner_text("#slice-info") == f"axial slice {max(k + 1 - 5, 1)} / 10"
        assert "RAS+ (x, y, z) = (" in page.inner_text("#location")
        # Mask, outline, crosshair, window preset.
        page.keyboard.press("m")
        assert not page.is_checked("#show-mask") and js(page, "return window.khe.nv.drawOpacity;") == 0
        page.keyboard.press("m")
        page.keyboard.press("o")
        assert page.is_checked("#outline")
        assert js(page, "return window.khe.nv.drawRimOpacity;") == pytest.approx(0.5)
        assert js(page, "return window.khe.nv.drawOpacity;") < 0.01
        page.keyboard.press("x")
        assert not page.is_checked("#show-crosshair") and js(page, "return window.khe.nv.opts.crosshairWidth;") == 0
        page.keyboard.press("w")
        assert page.input_value("#window-preset") == "lesion"
        # Typing in the comment box never triggers a key; Escape leaves it.
        page.focus("#comment")
        page.keyboard.type("a rather dark case, no motion")
        page.keyboard.press("Escape")
        assert page.input_value("#comment") == "a rather dark case, no motion"
        assert page.locator("#history li").count() == 0 and page.url.endswith(order[0])
        # A: accept (twice, fast: one revision), then on to the next unread case.
        page.keyboard.press("a")
        page.keyboard.press("a")
        # The signature, by keyboard too: the dialog has the password box focused (the second "a" went there).
        page.wait_for_selector(SIGN_DIALOG)
        page.keyboard.press("Control+A")
        page.keyboard.type(READER_PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/case/{order[1]}", timeout=30000)
        page.wait_for_selector(READY, timeout=30000)
        (read,) = store.read_history(db, order[0])
        assert read["verdict"] == "accept" and read["comment"] == "a rather dark case, no motion"
        # P back, N forward, P back; U to the next unread (order[1], the one we are on is unread too: skip to it).
        page.keyboard.press("p")
        page.wait_for_url(f"**/case/{order[0]}")
        page.wait_for_selector(READY, timeout=30000)
        assert page.inner_text("#status").startswith("Current: Accept (revision 1)")
        page.keyboard.press("n")
        page.wait_for_url(f"**/case/{order[1]}")
        page.wait_for_selector(READY, timeout=30000)
        page.keyboard.press("p")
        page.wait_for_url(f"**/case/{order[0]}")
        page.wait_for_selector(READY, timeout=30000)
        page.keyboard.press("u")
        page.wait_for_url(f"**/case/{order[1]}")
        page.wait_for_selector(READY, timeout=30000)
        # Auto-advance off (remembered): the verdict stays on the page.
        page.keyboard.press("r")
        sign(page)
        page.wait_for_url(f"**/case/{order[2]}", timeout=30000)
        page.wait_for_selector(READY, timeout=30000)
        page.click("#auto-advance")
        page.reload()
        page.wait_for_selector(READY, timeout=30000)
        assert not page.is_checked("#auto-advance")
        # A double click on a button records one revision too.
        page.dblclick("button.verdict[data-verdict='reject']")
        sign(page)
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Current: Reject')")
        page.wait_for_function("() => !window.khe.saving")
        assert page.url.endswith(order[2]) and len(store.read_history(db, order[2])) == 1
        assert page.inner_text("#next-unread") == "no unread case left"
        # 0: no residual lesion (a revision of a signed read: signed again, with a reason).
        page.keyboard.press("0")
        sign(page)
        page.wait_for_function(
            "() => document.getElementById('status').textContent.startsWith('Current: No residual lesion (revision 2)')")
        assert [r["verdict"] for r in store.read_history(db, order[2])] == ["reject", "no_residual_lesion"]
    assert not served.errors, served.errors


@pytest.mark.slow
def test_display_loading_and_caching(package, tmp_path):
    from tests.test_qa_app import reader_browser

    results, codes = package
    code = codes[("sub-01", "ses-baseline")]
    no_mask = codes[("sub-02", "ses-baseline")]
    with reader_browser(results, tmp_path, auto_advance=True) as served:
        page, base = served.page, served.base
        # While the image loads, the buttons are off, the page says so, and the mask box is honoured.
        held = []
        page.route("**/files/*_t2.nii.gz", lambda route: held.append(route))
        page.goto(f"{base}/case/{code}")
        page.wait_for_function("() => window.khe !== undefined")
        page.wait_for_timeout(300)
        assert held and page.is_visible("#load-state") and "Loading" in page.inner_text("#load-state")
        assert page.is_disabled("button.verdict[data-verdict='accept']") and page.is_disabled("#zoom-in")
        page.click("#show-mask")  # unchecked during loading
        for route in held:
            route.continue_()
        page.unroute("**/files/*_t2.nii.gz")
        page.wait_for_selector(READY, timeout=30000)
        assert not page.is_visible("#load-state") and page.is_enabled("button.verdict[data-verdict='accept']")
        assert not page.is_checked("#show-mask") and js(page, "return window.khe.nv.drawOpacity;") == 0

        # Radiological by default: the patient's right (+x, RAS) on the screen's left.
        page.keyboard.press("1")
        assert js(page, "return window.khe.nv.opts.isRadiologicalConvention;") is True

        def x_mm_at(fraction):
            return page.evaluate("""(f) => { const nv = window.khe.nv; const c = nv.canvas;
                const frac = nv.canvasPos2frac([c.width * f, c.height / 2]);
                return nv.frac2mm(frac, 0, true)[0]; }""", fraction)

        assert x_mm_at(0.4) > x_mm_at(0.6)
        page.click("#radiological")
        assert x_mm_at(0.4) < x_mm_at(0.6)

        # Window: presets from robust percentiles, numbers, Reset restores zoom and window.
        view = page.evaluate("() => JSON.parse(document.getElementById('case-data').textContent)")
        auto = view["image_info"]["windows"]["auto"]
        cal = page.evaluate("() => [window.khe.nv.volumes[0].cal_min, window.khe.nv.volumes[0].cal_max]")
        assert cal == pytest.approx(auto, rel=1e-4)
        page.fill("#win-width", "100")
        page.fill("#win-level", "300")
        page.press("#win-level", "Enter")
        assert page.evaluate("() => [window.khe.nv.volumes[0].cal_min, window.khe.nv.volumes[0].cal_max]") == [250, 350]
        assert page.input_value("#window-preset") == "custom"
        opened = js(page, "return Array.from(window.khe.nv.scene.pan2Dxyzmm);")
        page.click("#zoom-in")
        assert js(page, "return window.khe.nv.scene.pan2Dxyzmm[3];") > opened[3]
        page.click("#zoom-reset")  # back to the view the case opened with (on the lesion)
        assert js(page, "return Array.from(window.khe.nv.scene.pan2Dxyzmm);") == pytest.approx(opened)
        assert page.evaluate("() => [window.khe.nv.volumes[0].cal_min, window.khe.nv.volumes[0].cal_max]") == \
            pytest.approx(auto, rel=1e-4)
        # Opacity slider.
        page.click("#show-mask")
        page.fill("#mask-opacity", "0.8")
        assert js(page, "return window.khe.nv.drawOpacity;") == pytest.approx(0.8)

        # A case without a mask (0 mL-like) opens on the robust window, not washed out by the maximum.
        open_case(page, base, no_mask)
        view = page.evaluate("() => JSON.parse(document.getElementById('case-data').textContent)")
        cal_max = js(page, "return window.khe.nv.volumes[0].cal_max;")
        assert cal_max == pytest.approx(view["image_info"]["windows"]["auto"][1], rel=1e-4)
        assert cal_max < js(page, "return window.khe.nv.volumes[0].global_max;")

        # The viewer script was fetched from the server once for three case pages.
        served.log.flush()
        log = (tmp_path / "server.log").read_text()
        assert log.count("GET /vendor/niivue.umd.js?v=") == 1, log

        # A failed image load says so with the HTTP status, and nothing can be clicked.
        (results / "qa" / "R1" / f"{code}_t2.nii.gz").unlink()
        page.goto(f"{base}/case/{code}")
        page.wait_for_selector("body[data-load-error='1']", timeout=30000)
        assert "The image could not be loaded: HTTP 500" in page.inner_text("#load-state")  # the server's error
        assert not page.is_visible("text=Loading the image")  # not "loading ..." forever
        assert page.is_disabled("button.verdict[data-verdict='accept']")
    assert not [e for e in served.errors if "HTTP" not in e], served.errors


@pytest.mark.slow
def test_unsaved_work_and_comment_limit(package, tmp_path):
    from playwright.sync_api import Error as PlaywrightError

    from tests.test_qa_app import reader_browser, sign

    results, _ = package
    db = results / "reads" / "R1.sqlite"
    with reader_browser(results, tmp_path, auto_advance=True) as served:
        page, base = served.page, served.base
        page.goto(base + "/")
        code = page.locator("table.worklist a").first.inner_text()  # has a next case
        open_case(page, base, code)
        # A comment over the limit is refused with a message, never cut.
        page.fill("#comment", "x" * (COMMENT_MAX_CHARS + 1))
        assert "over" in page.get_attribute("#comment-count", "class")
        assert page.inner_text("#comment-count") == f"{COMMENT_MAX_CHARS + 1} / {COMMENT_MAX_CHARS} characters"
        page.click("button.verdict[data-verdict='accept']")
        assert f"at most {COMMENT_MAX_CHARS}" in page.inner_text("#error")
        assert store.read_history(db, code) == [] and page.input_value("#comment") == "x" * (COMMENT_MAX_CHARS + 1)
        page.fill("#comment", "")
        # Unsaved edits (edit.js's hook) stop in-app navigation and a page unload until confirmed.
        page.evaluate("() => { window.khe.hasUnsavedEdits = () => true; }")
        dialogs = []

        def answer(dialog, accept):
            dialogs.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        page.once("dialog", lambda d: answer(d, False))
        page.keyboard.press("Escape")  # out of the comment box, where N is a letter
        page.keyboard.press("n")
        page.wait_for_timeout(300)
        assert dialogs and "not saved" in dialogs[0] and page.url.endswith(code)
        page.once("dialog", lambda d: answer(d, False))
        page.click("#next")
        page.wait_for_timeout(300)
        assert len(dialogs) == 2 and page.url.endswith(code)
        # Leaving through the browser (address bar, reload, closing the tab) asks too: its own prompt
        # (beforeunload); dismissed, the navigation is abandoned and the case stays.
        unload = []
        page.once("dialog", lambda d: (unload.append(d.type), d.dismiss()))
        with pytest.raises(PlaywrightError):
            page.goto(base + "/", timeout=10000)
        assert unload == ["beforeunload"] and page.url.endswith(code)
        page.once("dialog", lambda d: answer(d, True))
        page.click("#next")
        page.wait_for_url(lambda url: not url.endswith(code), timeout=30000)
        page.wait_for_selector(READY, timeout=30000)
        # Without the hook: a pen stroke not yet saved counts as unsaved.
        page.keyboard.press("d")
        page.wait_for_function("() => window.khe.editing === true")
        box = page.locator("#gl").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.32, box["y"] + box["height"] * 0.4, steps=8)
        page.mouse.up()
        assert page.evaluate("() => window.khe.hasUnsaved()")
        page.click("#save-edit")
        sign(page)
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Current: Edited')")
        assert not page.evaluate("() => window.khe.hasUnsaved()")
    assert not served.errors, served.errors


def make_oblique(results, code, degrees=20.0):
    """Rewrite a packaged case (image and proposed mask) on a grid tilted about x (an oblique acquisition)."""
    t = np.radians(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    for name in (f"{code}_t2.nii.gz", f"{code}_mask.nii.gz"):
        path = results / "qa" / "R1" / name
        img = nib.load(path)
        affine = img.affine.copy()
        affine[:3, :3] = rot @ affine[:3, :3]
        out = nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header)
        out.set_sform(affine, code=1)
        out.set_qform(affine, code=1)
        nib.save(out, path)
    return nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz").affine


@pytest.mark.slow
def test_oblique_series_open_in_their_native_plane(package, tmp_path):
    from tests.test_qa_app import reader_browser

    results, codes = package
    code = codes[("sub-01", "ses-baseline")]
    straight = codes[("sub-01", "ses-m06")]
    affine = make_oblique(results, code)
    with reader_browser(results, tmp_path, auto_advance=True) as served:
        page, base = served.page, served.base
        open_case(page, base, straight)
        # NiiVue's voxel-grid display for every series (straight ones look the same either way).
        assert page.is_checked("#native-plane") and "oblique" not in page.inner_text("label:has(#native-plane)")
        open_case(page, base, code)
        assert page.is_checked("#native-plane") and "oblique 20" in page.inner_text("label:has(#native-plane)")
        assert js(page, "return window.khe.nv.opts.isSliceMM;") is False

        def crosshair_mm():
            return np.array(page.evaluate(
                "() => Array.from(window.khe.nv.frac2mm(window.khe.nv.scene.crosshairPos, 0, true)).slice(0, 3)"))

        # One slice up in the native plane is one acquisition slice: the grid's own slice axis.
        page.keyboard.press("1")
        before = crosshair_mm()
        page.keyboard.press("ArrowUp")
        assert crosshair_mm() - before == pytest.approx(affine[:3, 2], abs=1e-3)
        assert page.inner_text("#slice-info").endswith(" / 10")
        # The crosshair stays on a voxel centre of the series grid.
        ijk = np.linalg.solve(affine, np.r_[crosshair_mm(), 1])[:3]
        assert ijk == pytest.approx(np.round(ijk), abs=1e-3)
        # Off: resliced along the scanner axes (NiiVue's world space).
        page.click("#native-plane")
        assert js(page, "return window.khe.nv.opts.isSliceMM;") is True
    assert not served.errors, served.errors


def acquisition_slice_type(affine):
    """NiiVue's slice type across a grid's thickest voxel axis (0 axial, 1 coronal, 2 sagittal)."""
    axes = np.asarray(affine, float)[:3, :3]
    thick = int(np.argmax(np.linalg.norm(axes, axis=0)))
    return {2: 0, 1: 1, 0: 2}[int(np.argmax(np.abs(axes[:, thick])))]


def canvas_fraction(page, mm):
    """Where a scanner RAS+ mm point is on the case's canvas (fractions of its width and height)."""
    return page.evaluate(
        """(mm) => { const v = window.khe.nv;
                     const p = v.frac2canvasPosWithTile(v.mm2frac(mm, 0, true), v.opts.sliceType).pos;
                     return [p[0] / v.canvas.width, p[1] / v.canvas.height]; }""", [float(v) for v in mm])


@pytest.mark.slow
def test_a_case_opens_on_its_lesion_in_its_acquisition_plane_and_the_image_takes_the_screen(package, tmp_path):
    """Issue 24 (7, 9): at 1366x768 the canvas is on screen and has most of the height; the case opens
    in the plane it was acquired in, centred on the proposed mask; each pane says where its slice is in mm
    and labels a reformat across thick slices; the key map lists each key once, and X, O, D mean the same
    while editing as while reading; the ruler measures in mm."""
    from tests.test_qa_app import reader_browser

    results, codes = package
    code = codes[("sub-01", "ses-m06")]  # a permuted, flipped grid: its slices are not along the array's last axis
    folder = results / "qa" / "R1"
    image = nib.load(folder / f"{code}_t2.nii.gz")
    mask = nib.load(folder / f"{code}_mask.nii.gz")
    ijk = np.argwhere(np.asarray(mask.dataobj) != 0)
    centre_mm = nib.affines.apply_affine(mask.affine, (ijk.min(axis=0) + ijk.max(axis=0)) / 2)
    thick_mm = float(np.linalg.norm(image.affine[:3, :3], axis=0).max())
    with reader_browser(results, tmp_path) as served:
        page = served.page
        page.set_viewport_size({"width": 1366, "height": 768})
        open_case(page, served.base, code)
        box = page.locator("#gl").bounding_box()
        assert 0 <= box["y"] and box["y"] + box["height"] <= 768 and box["height"] >= 0.6 * 768, box
        acquired = acquisition_slice_type(image.affine)
        assert js(page, "return window.khe.nv.opts.sliceType;") == acquired
        x, y = canvas_fraction(page, centre_mm)
        assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1, (x, y)
        # The slice's position in mm; the acquired plane is no reformat, another plane across the slices is.
        plane = ["axial", "coronal", "sagittal"][acquired]
        axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
        crosshair = page.evaluate("() => Array.from(window.khe.nv.frac2mm(window.khe.nv.scene.crosshairPos, 0, true))")
        assert page.inner_text("#slice-mm").startswith(plane) and f"= {crosshair[axis]:.1f} mm" in page.inner_text(
            "#slice-mm")
        assert not page.is_visible("#reformat")
        other = (acquired + 1) % 3
        page.keyboard.press(str(other + 1))
        page.wait_for_function("() => !document.getElementById('reformat').hidden")
        assert f"reformat across {thick_mm:.1f} mm slices" in page.inner_text("#reformat")
        page.keyboard.press(str(acquired + 1))
        page.wait_for_function("() => document.getElementById('reformat').hidden")
        # The key map: each key listed once.
        keys = page.locator("#key-map table.keys kbd").evaluate_all("els => els.map((e) => e.textContent)")
        singles = [k.lower() for k in keys if len(k) == 1]
        assert len(singles) == len(set(singles)) and {"x", "o", "d", "g", "f", "s", "t"} <= set(singles), keys
        # While editing, X, O and D keep their meaning: crosshair, outline display, Edited (the pen's own: G, F, S).
        page.keyboard.press("d")
        page.wait_for_function("() => window.khe.editing === true")
        assert page.inner_text("#pen-state") == "2D brush: paint"
        page.keyboard.press("x")
        assert not page.is_checked("#show-crosshair") and page.inner_text("#pen-state") == "2D brush: paint"
        page.keyboard.press("o")
        assert page.is_checked("#outline") and page.inner_text("#pen-state") == "2D brush: paint"
        page.keyboard.press("d")
        assert not page.is_checked("#brush-3d") and page.inner_text("#pen-state") == "2D brush: paint"
        page.keyboard.press("g")
        assert page.inner_text("#pen-state") == "2D brush: erase"
        page.keyboard.press("s")
        assert page.is_checked("#brush-3d")
        page.keyboard.press("Escape")
        page.keyboard.press("x")
        assert page.is_checked("#show-crosshair")
        # The ruler (key T): a left drag measures; the length in mm is the distance between its ends.
        page.keyboard.press("t")
        assert page.get_attribute("#ruler", "aria-pressed") == "true"
        box = page.locator("#gl").bounding_box()
        start = (box["x"] + 0.35 * box["width"], box["y"] + 0.5 * box["height"])
        end = (box["x"] + 0.6 * box["width"], box["y"] + 0.5 * box["height"])
        ends_mm = [page.evaluate(
            """([x, y]) => { const r = document.getElementById('gl').getBoundingClientRect();
                             const nv = window.khe.nv;
                             return Array.from(nv.frac2mm(nv.canvasPos2frac([x - r.left, y - r.top]))).slice(0, 3); }""",
            list(p)) for p in (start, end)]
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=8)
        page.mouse.up()
        page.wait_for_function("() => window.khe.lastMeasurementMm !== undefined")
        length = js(page, "return window.khe.lastMeasurementMm;")
        # Within a voxel (1 mm in-plane here): NiiVue measures from where the drag is first seen.
        assert length == pytest.approx(float(np.linalg.norm(np.subtract(ends_mm[1], ends_mm[0]))), abs=1.0)
        assert page.inner_text("#ruler-length") == f"ruler: {length:.1f} mm"
    assert not served.errors, served.errors
