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
