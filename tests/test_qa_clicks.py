"""Click segmentation in the reader app: the segment endpoint and reads saved from clicks.

Real reader packages (``khe-vol qa package``) of a synthetic lesion with a
bright fluid collection beside it, the real Flask app through its test client.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.nifti import load_image, load_series
from khe_vol.qa import store
from khe_vol.geometry import voxel_to_world
from khe_vol.qa.app import MAX_CLICKS_BYTES, CaseSessions, air_level, create_app, display_windows, in_body
from khe_vol.qa.key import read_key
from khe_vol.segmentation.interactive import clicks_from_json, segment_clicks
from tests.qa_cohort import write_phantom_cases

HEADERS = {"X-Khe-Vol": "reader"}


@pytest.fixture(scope="module")
def phantom_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("clicks")
    records, scene = write_phantom_cases(root)
    results = root / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "123412341234",
                 *map(str, records)]) == 0
    codes = {r["participant_id"]: r["case_code"] for r in read_key(results) if r["case_code"]}
    worklist = json.loads((results / "qa" / "R1" / "worklist.json").read_text())
    cases = {c["case_code"]: c for c in worklist["cases"]}
    # Honest set-up: the case whose series had no seed has no proposed mask.
    assert cases[codes["sub-01"]]["proposed_mask"] is None and cases[codes["sub-02"]]["proposed_mask"]
    return results, codes, scene


@pytest.fixture
def client(phantom_package, tmp_path):
    results, _, _ = phantom_package
    app = create_app(results, "R1", db_path=tmp_path / "reads.sqlite", check_viewer=False)
    return app.test_client()


def clicks(*pairs):
    return [{"kind": kind, "ras_mm": [float(v) for v in point]} for kind, point in pairs]


def segment(client, code, click_list, headers=HEADERS):
    return client.post(f"/api/case/{code}/segment", data=json.dumps({"clicks": click_list}), headers=headers,
                       content_type="application/json")


def case_files(results, code):
    folder = results / "qa" / "R1"
    image = load_series(folder / f"{code}_t2.nii.gz")
    proposed = folder / f"{code}_mask.nii.gz"
    start = load_image(proposed, "mask").data != 0 if proposed.is_file() else None
    return image, start


def answered_mask(resp, results, code):
    """The endpoint's mask, checked to be on the case grid."""
    assert resp.status_code == 200, resp.get_data(as_text=True)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(resp.data))
    case = nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    assert img.shape == case.shape and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, case.affine, atol=1e-5)
    mask = np.asarray(img.dataobj)
    assert float(resp.headers["X-Volume-Ml"]) == pytest.approx(mask.sum() * 4.0 / 1000.0)
    return mask


def test_include_click_seeds_a_case_without_a_proposed_mask_and_exclude_shrinks(phantom_package, client):
    results, codes, scene = phantom_package
    code = codes["sub-01"]
    image, start = case_files(results, code)
    assert start is None
    seed, fluid, fluid_deep = scene["seed_ras_mm"], scene["fluid_ras_mm"], scene["fluid_deep_ras_mm"]

    for first in ([], clicks(("exclude", seed))):  # nothing to start from but an include in the lesion
        resp = segment(client, code, first)
        assert resp.status_code == 400 and "first click must be an include" in resp.json["error"]

    steps = [clicks(("include", seed)), clicks(("include", seed), ("include", fluid)),
             clicks(("include", seed), ("include", fluid), ("exclude", fluid_deep))]
    masks = []
    for step in steps:
        resp = segment(client, code, step)
        masks.append(answered_mask(resp, results, code))
        assert resp.headers["X-N-Clicks"] == str(len(step)) and resp.headers["X-Start"] == "seed"
        # The server's kept session gives what the one-shot engine gives from the case file.
        expected, _ = segment_clicks(image.data, image.affine, clicks_from_json(step))
        assert np.array_equal(masks[-1], expected)
    seeded, grown, cut = (m.sum() * 4.0 / 1000.0 for m in masks)
    assert seeded == pytest.approx(scene["lesion_ml"], rel=0.15)  # the seed segments the lesion
    assert grown > seeded + 3.0  # the include on the fluid brought it in
    # The exclude takes its side of the fluid back out; the include's side stays (the reader
    # said both): at least a sizeable share of the fluid goes, and nothing is added.
    assert cut < grown - 1.5 and np.all(masks[2] <= masks[1])
    # Undo (a shorter list) answers the earlier mask again.
    assert np.array_equal(answered_mask(segment(client, code, steps[0]), results, code), masks[0])


def test_the_proposed_mask_is_the_start_of_a_case_that_has_one(phantom_package, client):
    results, codes, scene = phantom_package
    code = codes["sub-02"]
    image, start = case_files(results, code)
    assert np.array_equal(answered_mask(segment(client, code, []), results, code), start)
    step = clicks(("exclude", scene["fluid_deep_ras_mm"]))
    resp = segment(client, code, step)
    cut = answered_mask(resp, results, code)
    assert resp.headers["X-Start"] == "mask"
    expected, _ = segment_clicks(image.data, image.affine, clicks_from_json(step), start_mask=start)
    assert np.array_equal(cut, expected)
    assert cut.sum() < start.sum() and np.all(cut <= start)
    assert cut.sum() * 4.0 / 1000.0 == pytest.approx(scene["lesion_ml"], rel=0.15)


def test_hostile_segment_requests_are_refused_with_a_readable_error(phantom_package, client):
    _, codes, scene = phantom_package
    code = codes["sub-01"]
    url = f"/api/case/{code}/segment"
    seed = [float(v) for v in scene["seed_ras_mm"]]
    bodies = [
        b"", b"not json", b"[]", b"null", b'{"clicks": 3}', b'{"clicks": [], "extra": 1}', b'{"klicks": []}',
        b'{"clicks": [{"kind": "include"}]}', b'{"clicks": [{"kind": "grow", "ras_mm": [0, 0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": [0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": [NaN, 0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": [1e999, 0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": ["1", 0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": [true, 0, 0]}]}',
        b'{"clicks": [{"kind": "include", "ras_mm": [' + b"9" * 5000 + b', 0, 0]}]}',
        b"[" * 100000 + b"]" * 100000,
        json.dumps({"clicks": [{"kind": "include", "ras_mm": seed}] * 201}).encode(),  # more than the engine takes
        b'{"clicks": [{"kind": "include", "ras_mm": [0, 0, 0]}' + b", 1" * MAX_CLICKS_BYTES + b"]}",
        "{\"clicks\": [{\"kind\": \"\u00e9\\ud800\", \"ras_mm\": [0, 0, 0]}]}".encode(),
        b"\xff\xfe\x00garbage",
        json.dumps({"clicks": [{"kind": "include", "ras_mm": [9999.0, 0.0, 0.0]}]}).encode(),  # outside the image
    ]
    for body in bodies:
        resp = client.post(url, data=body, headers=HEADERS, content_type="application/json")
        # a body over what the route can need is refused before parsing (413), the rest when read (400)
        expected = 413 if len(body) > MAX_CLICKS_BYTES else 400
        assert resp.status_code == expected, (body[:80], resp.status_code)
        assert resp.json["error"] and "Traceback" not in resp.json["error"]
    outside = client.post(url, data=bodies[-1], headers=HEADERS, content_type="application/json")
    assert "outside the image" in outside.json["error"]
    good = json.dumps({"clicks": [{"kind": "include", "ras_mm": seed}]})
    assert client.post(url, data=good, content_type="application/json").status_code == 403  # no app header
    assert client.post(url, data=good, headers=HEADERS | {"Host": "evil.example"},
                       content_type="application/json").status_code == 403
    assert client.post("/api/case/NOSUCHCASE/segment", data=good, headers=HEADERS,
                       content_type="application/json").status_code == 404
    assert client.post(url, data=good, headers=HEADERS, content_type="application/json").status_code == 200


def test_a_read_saved_from_clicks_stores_the_clicks_and_the_recomputed_mask(phantom_package, client, tmp_path):
    results, codes, scene = phantom_package
    code = codes["sub-01"]
    db = tmp_path / "reads.sqlite"
    image, _ = case_files(results, code)
    step = clicks(("include", scene["seed_ras_mm"]), ("include", scene["fluid_ras_mm"]),
                  ("exclude", scene["fluid_deep_ras_mm"]))

    def save(verdict="edited", click_text=None, mask=None):
        data = {"verdict": verdict, "comment": "seeded"}
        if click_text is not None:
            data["clicks"] = click_text
        if mask is not None:
            data["mask"] = (io.BytesIO(mask), "drawing.nii")
        return client.post(f"/api/case/{code}/read", data=data, headers=HEADERS)

    drawing = nib.Nifti1Image(np.zeros(image.data.shape, np.uint8), image.affine).to_bytes()
    refused = [save(click_text=json.dumps(step), mask=drawing),  # both: which one is the read?
               save("accept", click_text=json.dumps(step)), save(click_text="[]"), save(click_text="{"),
               save(click_text=json.dumps(clicks(("exclude", scene["seed_ras_mm"])))),
               save(click_text="[" + "1," * MAX_CLICKS_BYTES + "1]")]
    for resp in refused:
        assert resp.status_code == 400 and resp.json["error"]
    assert store.current_reads(db) == []  # nothing stored by a refused save

    resp = save(click_text=json.dumps(step))
    assert resp.status_code == 200 and resp.json["current"]["verdict"] == "edited"
    assert resp.json["current"]["clicks"] == step
    (read,) = store.current_reads(db)
    assert read["verdict"] == "edited" and read["clicks"] == step  # in order, with their kinds
    saved = nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"]))
    assert np.array_equal(saved.affine, nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz").affine)
    # Anyone can recompute the stored mask from the case image and the stored clicks.
    expected, info = segment_clicks(image.data, image.affine, clicks_from_json(read["clicks"]))
    assert np.array_equal(np.asarray(saved.dataobj), expected)
    assert read["edited_volume_ml"] == pytest.approx(info["volume_ml"])
    # The page reloads the clicks to go on from them.
    assert json.loads(client.get(f"/api/case/{code}").data)["current"]["clicks"] == step


def test_a_rebuilt_proposed_mask_is_not_served_from_the_kept_session(phantom_package, tmp_path):
    results, codes, _ = phantom_package
    code = codes["sub-02"]
    copy = tmp_path / "results"
    import shutil

    shutil.copytree(results / "qa", copy / "qa")
    client = create_app(copy, "R1", db_path=tmp_path / "reads.sqlite", check_viewer=False).test_client()
    first = answered_mask(segment(client, code, []), copy, code)
    proposed = copy / "qa" / "R1" / f"{code}_mask.nii.gz"
    img = nib.load(proposed)
    changed = np.asarray(img.dataobj).copy()
    changed[:, :, :8] = 0  # a different proposal, as a rebuilt package would bring
    proposed.write_bytes(gzip.compress(nib.Nifti1Image(changed, img.affine, img.header).to_bytes(), mtime=0))
    again = answered_mask(segment(client, code, []), copy, code)
    assert not np.array_equal(again, first) and np.array_equal(again, changed)


def test_the_session_cache_keeps_only_the_most_recent_cases():
    cache = CaseSessions(max_cases=2)
    a, b = cache.get("a"), cache.get("b")
    assert cache.get("a") is a  # used again: now the most recent
    cache.get("c")  # evicts b, the least recently used
    assert cache.get("a") is a and cache.get("b") is not b


@pytest.mark.slow  # a real browser
def test_a_reader_seeds_and_steers_a_case_in_a_real_browser(phantom_package, tmp_path):
    from khe_vol.qa.app import find_niivue
    from tests.test_qa_app import reader_browser, wait_status

    find_niivue()
    results, codes, scene = phantom_package
    code = codes["sub-01"]
    image, _ = case_files(results, code)
    targets = [("include", scene["seed_ras_mm"]), ("include", scene["fluid_ras_mm"]),
               ("exclude", scene["fluid_deep_ras_mm"])]
    with reader_browser(results, tmp_path) as served:
        page, base, urls, errors = served.page, served.base, served.urls, served.errors
        page.goto(f"{base}/case/{code}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert page.is_visible("#seed-prompt") and "click inside the lesion" in page.inner_text("#seed-prompt")
        assert page.is_checked("#click-mode")  # a case to seed starts in click mode
        assert page.is_disabled("button.verdict[data-verdict='accept']")  # nothing to accept yet
        assert "Shift" in page.inner_text("#click-hint")  # on the toolbar; the full help is in the key map
        page.click("button[data-slice='0']")  # axial
        volumes = []
        for n, (kind, mm) in enumerate(targets, start=1):
            click_at(page, mm, shift=kind == "exclude")
            page.wait_for_function("(n) => window.khe.clicks.length === n && !window.khe.busy", arg=n,
                                   timeout=30000)
            text = page.inner_text("#click-volume")
            assert text.endswith(f"mL ({n} click{'s' if n > 1 else ''})"), text
            volumes.append(float(text.split()[0]))
            assert page.inner_text("#error") == ""
        assert not page.is_visible("#seed-prompt")
        assert volumes[1] > volumes[0] and volumes[2] < volumes[1]  # include grew it, exclude cut it
        assert page.locator("#click-list li").evaluate_all("els => els.map(e => e.className)") == [
            "include", "include", "exclude"]
        # Undo and redo from the keyboard.
        page.keyboard.press("Control+z")
        page.wait_for_function("() => window.khe.clicks.length === 2 && !window.khe.busy", timeout=30000)
        assert float(page.inner_text("#click-volume").split()[0]) == volumes[1]
        page.keyboard.press("Control+y")
        page.wait_for_function("() => window.khe.clicks.length === 3 && !window.khe.busy", timeout=30000)
        assert float(page.inner_text("#click-volume").split()[0]) == volumes[2]
        assert page.inner_text("button.verdict[data-verdict='accept']") == "Accept clicked mask"
        assert page.evaluate("() => window.khe.hasUnsaved()")  # leaving now would ask: the clicks are not saved
        page.click("button.verdict[data-verdict='accept']")
        wait_status(page, "Current: Edited (revision 1), edited volume")
        assert not page.evaluate("() => window.khe.hasUnsaved()")
    assert not errors, errors
    assert all(u.startswith((base + "/", "data:", "blob:")) for u in urls), urls

    (read,) = store.current_reads(results / "reads" / "R1.sqlite")
    assert read["verdict"] == "edited" and [c["kind"] for c in read["clicks"]] == ["include", "include", "exclude"]
    for click, (_, mm) in zip(read["clicks"], targets):
        # Each click is the centre of the voxel clicked, in the image's own RAS+ mm.
        ijk = np.linalg.solve(image.affine, np.r_[click["ras_mm"], 1.0])[:3]
        assert np.allclose(ijk, np.round(ijk), atol=1e-3)
        assert np.array_equal(np.round(ijk), np.round(np.linalg.solve(image.affine, np.r_[mm, 1.0])[:3]))
    saved = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"])).dataobj)
    expected, info = segment_clicks(image.data, image.affine, clicks_from_json(read["clicks"]))
    assert np.array_equal(saved, expected)
    assert read["edited_volume_ml"] == pytest.approx(info["volume_ml"]) == pytest.approx(volumes[2], abs=0.006)


def test_a_reader_draws_a_box_sets_its_slices_and_accepts_in_a_real_browser(phantom_package, tmp_path):
    """The box tool: drag a rectangle on the axial slice through the lesion, set the first and
    last slice at the crosshair, accept; the read keeps the box as its first interaction."""
    from khe_vol.qa.app import find_niivue
    from khe_vol.segmentation.seeded import segment_from_seed
    from tests.test_qa_app import reader_browser, wait_status

    find_niivue()
    results, codes, scene = phantom_package
    code = codes["sub-01"]
    image, _ = case_files(results, code)
    lesion = segment_from_seed(image.data, image.affine, scene["seed_ras_mm"])[0] != 0
    idx = np.argwhere(lesion)
    (i0, j0, k0), (i1, j1, k1) = idx.min(axis=0), idx.max(axis=0)
    k_mid = (k0 + k1) // 2
    with reader_browser(results, tmp_path) as served:
        page, base, errors = served.page, served.base, served.errors
        page.goto(f"{base}/case/{code}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        page.click("button[data-slice='0']")  # axial
        corners = page.evaluate(
            """([a, b]) => {
                const nv = window.khe.nv;
                nv.scene.crosshairPos = nv.vox2frac(a);
                nv.drawScene();
                return [Array.from(nv.frac2canvasPos(nv.vox2frac(a))), Array.from(nv.frac2canvasPos(nv.vox2frac(b)))];
            }""",
            [[int(i0) - 2, int(j0) - 2, int(k_mid)], [int(i1) + 2, int(j1) + 2, int(k_mid)]],
        )
        origin = page.locator("#gl").bounding_box()
        page.click("#box-mode")
        assert page.get_attribute("#box-mode", "aria-pressed") == "true"
        page.mouse.move(origin["x"] + corners[0][0], origin["y"] + corners[0][1])
        page.mouse.down()
        page.mouse.move(origin["x"] + corners[1][0], origin["y"] + corners[1][1], steps=5)
        page.mouse.up()
        page.wait_for_function("() => window.khe.clicks.length === 1 && !window.khe.busy", timeout=120000)
        assert page.inner_text("#error") == ""
        for button, k in (("#box-first", k0), ("#box-last", k1)):
            page.evaluate("(v) => { const nv = window.khe.nv; nv.scene.crosshairPos = nv.vox2frac(v); nv.drawScene(); }",
                          [int(i0 + i1) // 2, int(j0 + j1) // 2, int(k)])
            shown = page.evaluate("() => JSON.stringify(window.khe.clicks)")
            page.click(button)
            # Until the server answers, the mask on screen is the previous box's (busy is set a moment later).
            page.wait_for_function("(before) => JSON.stringify(window.khe.clicks) !== before && !window.khe.busy",
                                   arg=shown, timeout=120000)
            assert page.inner_text("#error") == ""
        assert page.locator("#click-list li").evaluate_all("els => els.map(e => e.className)") == ["box"]
        volume = float(page.inner_text("#click-volume").split()[0])
        page.click("button.verdict[data-verdict='accept']")
        # The server recomputes the box's mask from the read (the learned engine encodes its slices
        # again: 20 s on 2 idle cores), so this wait is as long as the box's own.
        wait_status(page, "Current: Edited (revision 1), edited volume", timeout=120000)
    assert not errors, errors
    (read,) = [r for r in store.current_reads(results / "reads" / "R1.sqlite") if r["case_code"] == code]
    box = read["clicks"][0]
    assert read["verdict"] == "edited" and [c["kind"] for c in read["clicks"]] == ["box"]
    # The box spans the lesion's slices, in the image's own RAS+ mm.
    z = sorted(np.linalg.solve(image.affine, np.r_[corner, 1.0])[2] for corner in (box["ras_mm"][:3], box["ras_mm"][3:]))
    assert z == pytest.approx([k0, k1], abs=0.01)
    saved = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"])).dataobj)
    expected, info = segment_clicks(image.data, image.affine, clicks_from_json(read["clicks"]))
    assert np.array_equal(saved, expected) and info["start"] == "box"
    assert read["edited_volume_ml"] == pytest.approx(volume, abs=0.006)
    # The learned engine's lesion against the classical engine's (not the truth): 0.80 here.
    overlap = 2 * (saved.astype(bool) & lesion).sum() / (saved.astype(bool).sum() + lesion.sum())
    assert overlap > 0.7


def click_at(page, ras_mm, shift=False):
    """Show the slice through a point (the crosshair there) and click the point on the axial view."""
    xy = page.evaluate(
        """(mm) => {
            const nv = window.khe.nv;
            const frac = nv.mm2frac(mm, 0, true);
            nv.scene.crosshairPos = nv.vox2frac(nv.frac2vox(frac));
            nv.drawScene();
            return Array.from(nv.frac2canvasPos(nv.scene.crosshairPos));
        }""",
        [float(v) for v in ras_mm],
    )
    page.click("#gl", position={"x": xy[0], "y": xy[1]}, modifiers=["Shift"] if shift else [])


def test_preparing_a_case_before_the_first_click_changes_nothing_but_the_wait(phantom_package, client):
    results, codes, scene = phantom_package
    for pid in ("sub-01", "sub-02"):  # no proposed mask (bias correction first), a proposed mask (its region)
        code = codes[pid]
        assert client.post(f"/api/case/{code}/prepare").status_code == 403  # the header, as for every post
        assert client.post(f"/api/case/{code}/prepare", headers=HEADERS).status_code == 204
        image, start = case_files(results, code)
        step = clicks(("include", scene["seed_ras_mm"]), ("exclude", scene["fluid_deep_ras_mm"]))
        expected, _ = segment_clicks(image.data, image.affine, clicks_from_json(step),
                                     start_mask=start)
        assert np.array_equal(answered_mask(segment(client, code, step), results, code), expected)
    assert client.post("/api/case/nope/prepare", headers=HEADERS).status_code == 404


def test_an_include_click_in_air_is_answered_with_a_warning(phantom_package, client):
    """Issue 24 (9): an include click outside the body (the dark background around the limb) is flagged in
    the answer, the mask still drawn; clicks in the lesion and excludes in air are not flagged."""
    results, codes, scene = phantom_package
    code = codes["sub-02"]  # a proposed mask: includes anywhere extend it
    image, _ = case_files(results, code)
    k = image.data.shape[2] // 2
    level = air_level(display_windows(image.data))
    air = voxel_to_world(np.array([[1, 1, k]]), image.affine)[0]
    assert not in_body(image.data, image.affine, (1, 1, k), level) and image.data[1, 1, k] < 20
    assert in_body(image.data, image.affine, (48, 48, k), level)  # the limb's middle
    inside = segment(client, code, clicks(("include", scene["more_seeds_ras_mm"][0])))
    assert inside.status_code == 200 and "X-Click-Warning" not in inside.headers
    both = segment(client, code, clicks(("include", scene["more_seeds_ras_mm"][0]), ("include", air)))
    answered_mask(both, results, code)
    warning = both.headers["X-Click-Warning"]
    assert warning.startswith("include click 2 at (") and "in air, outside the body" in warning
    excluded = segment(client, code, clicks(("include", scene["more_seeds_ras_mm"][0]), ("exclude", air)))
    assert excluded.status_code == 200 and "X-Click-Warning" not in excluded.headers


def test_the_page_says_it_is_preparing_marks_the_clicks_and_warns_of_a_click_in_air(phantom_package, tmp_path):
    """Issue 24 (6, 9): while the page's prepare runs, an accessible status says so (a click then waits for
    it); each click is marked on its slice; an include click in the air around the limb is flagged on screen."""
    from tests.test_qa_app import reader_browser

    results, codes, scene = phantom_package
    # The package without the module's reads (another test saved clicks on this case).
    results = Path(shutil.copytree(results, tmp_path / "results", ignore=shutil.ignore_patterns("reads")))
    code = codes["sub-01"]
    image, _ = case_files(results, code)
    k = int(np.round(np.linalg.solve(image.affine, np.r_[scene["seed_ras_mm"], 1.0])[2]))  # the seed's slice
    with reader_browser(results, tmp_path) as served:
        page = served.page
        held = []
        page.route("**/api/case/*/prepare", lambda route: held.append(route))  # the prepare is under way
        page.goto(f"{served.base}/case/{code}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        page.wait_for_function("() => document.getElementById('prepare-state').textContent.includes('Preparing')")
        assert page.get_attribute("#prepare-state", "role") == "status" and page.is_visible("#prepare-state")
        assert held
        held[0].continue_()
        page.wait_for_selector("body[data-prepared='1']", timeout=30000)
        assert page.inner_text("#prepare-state") == ""
        click_at(page, scene["seed_ras_mm"])
        page.wait_for_function("() => window.khe.clicks.length === 1 && !window.khe.busy", timeout=30000)
        page.wait_for_function("() => document.querySelectorAll('#click-markers .click-marker.include').length === 1")
        assert page.is_hidden("#air-warning")
        air = voxel_to_world(np.array([[1, 1, k]]), image.affine)[0]
        click_at(page, air)
        page.wait_for_function("() => window.khe.clicks.length === 2 && !window.khe.busy", timeout=30000)
        assert page.is_visible("#air-warning") and "include click 2" in page.inner_text("#air-warning")
        assert "in air, outside the body" in page.inner_text("#air-warning")
        # Only the slice shown carries its clicks' marks: both lie on this axial slice.
        page.wait_for_function("() => document.querySelectorAll('#click-markers .click-marker.include').length === 2")
        page.keyboard.press("Control+z")
        page.wait_for_function("() => window.khe.clicks.length === 1 && !window.khe.busy", timeout=30000)
        assert page.is_hidden("#air-warning")
        page.keyboard.press("ArrowUp")  # another slice: the seed's mark is not on it
        page.wait_for_function("() => document.querySelectorAll('#click-markers .click-marker').length === 0")
    assert not served.errors, served.errors
