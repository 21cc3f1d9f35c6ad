"""The reader app: a real server, a real headless Chromium, real drawing in NiiVue.

Needs Debian's Chromium (``apt-get install -y chromium``) and NiiVue
(``npm ci``); ``.ci/run`` installs both.
"""

from __future__ import annotations

import contextlib

import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.qa import accounts, store
from khe_vol.qa.app import create_app, find_niivue
from khe_vol.qa.key import read_key
from tests.qa_cohort import write_cohort

CHROMIUM = "/usr/bin/chromium"
# Software WebGL2, as on a machine without a GPU.
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture
def package(tmp_path):
    records = write_cohort(tmp_path)
    results = tmp_path / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "987654321987",
                 *map(str, records)]) == 0
    codes = {(r["participant_id"], r["session_id"]): r["case_code"] for r in read_key(results) if r["case_code"]}
    return results, codes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The password of the test reader's account (:func:`reader_account`).
READER_PASSWORD = "R1 reads in the test browser"


def reader_account(results, reader="R1", password=READER_PASSWORD):
    """Create (or reset) the reader's account in ``R/reads/accounts.sqlite`` with ``password``."""
    db = accounts.default_accounts_path(results)
    try:
        token = accounts.add_account(db, reader)
    except accounts.AccountError:
        token = accounts.reset_account(db, reader)
    accounts.enrol(db, token, password)


def start_server(results, port, log, *options):
    """The reading service (``khe-vol qa serve --results-dir R [options]``, waitress) on a local port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "khe_vol.cli", "qa", "serve", "--results-dir", str(results), "--port", str(port),
         *options],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start; log:\n{Path(log.name).read_text()}")


def kill_hard(proc):
    """kill -9 the server we started (its own process group: just it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class ServedPage:
    """R1's app on a local port and a Chromium page on it (see :func:`reader_browser`)."""

    def __init__(self, results, port, log):
        self.results, self.port, self.log = results, port, log
        self.base = f"http://127.0.0.1:{port}"
        self.urls, self.errors = [], []
        self.server = start_server(results, port, log)
        self.page = None

    def login(self, reader="R1", password=READER_PASSWORD):
        """Log in through the real login page."""
        self.page.goto(self.base + "/login")
        self.page.fill("#account", reader)
        self.page.fill("#password", password)
        with self.page.expect_navigation():
            self.page.click("#login")
        assert self.page.url == self.base + "/", self.page.inner_text("#error")

    def restart_server(self):
        """The server dies without warning and starts again on the same port (sessions are kept)."""
        kill_hard(self.server)
        self.server = start_server(self.results, self.port, self.log)


@contextlib.contextmanager
def reader_browser(results, tmp_path, auto_advance=False):
    """Serve the reading service from ``results``, open a Chromium page and log R1 in through
    the login page (R1's account is created): yields a :class:`ServedPage` recording every
    requested URL and page error; the browser is closed and the server killed afterwards.
    Verdicts are signed: :func:`wait_status` answers the signature dialog with R1's password.
    ``auto_advance``: leave the page's "go to the next unread case after a verdict" on (the
    reader's default); off, a test stays on the case it gave a verdict."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    reader_account(results)
    with open(tmp_path / "server.log", "w") as log:
        served = ServedPage(results, free_port(), log)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                served.page = browser.new_page(viewport={"width": 1300, "height": 900}, device_scale_factor=1)
                served.page.on("request", lambda r: served.urls.append(r.url))
                served.page.on("pageerror", lambda e: served.errors.append(str(e)))
                if not auto_advance:
                    served.page.add_init_script("window.localStorage.setItem('khe-vol.autoAdvance', '0');")
                served.login()
                yield served
                browser.close()
        finally:
            kill_hard(served.server)


def world_to_voxel(mm, affine):
    return np.linalg.solve(np.asarray(affine, float), np.r_[np.asarray(mm, float)[:3], 1.0])[:3]


@pytest.mark.slow  # a real browser
def test_reader_session_in_a_real_browser(package, tmp_path):
    find_niivue()  # fails with "run npm ci" when NiiVue is not installed
    results, codes = package
    target = codes[("sub-01", "ses-m06")]  # permuted, flipped grid: drawing must land in world space
    accepted = codes[("sub-01", "ses-baseline")]
    db = results / "reads" / "R1.sqlite"
    with reader_browser(results, tmp_path) as served:
        page, base, urls = served.page, served.base, served.urls
        page.goto(base + "/")
        assert page.inner_text("#progress") == "0 of 3 read"
        order = page.locator("table.worklist a").all_inner_texts()
        assert sorted(order) == sorted(codes.values())
        page.click(f"text={order[0]}")
        drawn_mm = None
        for position, code in enumerate(order, start=1):
            page.wait_for_selector("body[data-ready='1']", timeout=30000)
            assert page.inner_text("#code") == code
            if code == target:
                drawn_mm = draw_stroke(page)
                page.click("#save-edit")
                expected = "Current: Edited (revision 1)"
            else:
                verdict = "accept" if code == accepted else "no_residual_lesion"
                page.fill("#comment", f"comment {position}")
                page.click(f"button.verdict[data-verdict='{verdict}']")
                expected = "Current: " + ("Accept" if code == accepted else "No residual lesion")
            wait_status(page, expected)
            if position < len(order):
                page.click("#next")
        page.goto(base + "/")
        assert page.inner_text("#progress") == "3 of 3 read"

        # The server dies without warning; everything it confirmed is on disk.
        served.restart_server()
        page.goto(f"{base}/case/{target}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert page.inner_text("#status").startswith("Current: Edited (revision 1), edited volume")
        assert any(u.endswith("/revision/1/edited_mask.nii.gz") for u in urls)  # the edit is reloaded

        # Revising a verdict adds a revision; the history shows both.
        page.goto(f"{base}/case/{accepted}")
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        page.fill("#comment", "on second look: motion")
        page.click("button.verdict[data-verdict='reject']")
        wait_status(page, "Current: Reject (unmeasurable) (revision 2)")
        assert page.locator("#history li").all_inner_texts() == [
            f"revision 1: Accept: comment {order.index(accepted) + 1}",
            "revision 2: Reject (unmeasurable): on second look: motion"]
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert page.locator("#history li").count() == 2
    assert not served.errors, served.errors
    assert all(u.startswith((base + "/", "data:", "blob:")) for u in urls), urls

    # The store, as the workflow reads it.
    current = {r["case_code"]: r for r in store.current_reads(db)}
    assert {c: r["verdict"] for c, r in current.items()} == {
        accepted: "reject", target: "edited", codes[("sub-02", "ses-baseline")]: "no_residual_lesion"}
    assert [h["verdict"] for h in store.read_history(db, accepted)] == ["accept", "reject"]
    check_edited_mask(results, target, current[target], drawn_mm)


SIGN_DIALOG = "#sign-dialog[open]"


def sign(page, password=READER_PASSWORD, reason="revised in the test"):
    """Sign the verdict the page asks a signature for (a revision gets ``reason``)."""
    page.wait_for_selector(SIGN_DIALOG, timeout=10000)
    if page.is_visible("#sign-reason"):
        page.fill("#sign-reason", reason)
    page.fill("#sign-password", password)
    page.click("#sign-confirm")


def wait_status(page, prefix, timeout=30000):
    """Wait for the verdict's status line, signing the verdict first if the page asks (``timeout`` ms each)."""
    # A dialog whose signature is on its way (Sign is off until the server answers) is not asking.
    asking = "(!!document.querySelector(" + repr(SIGN_DIALOG) + ") && !document.getElementById('sign-confirm').disabled)"
    page.wait_for_function(
        "(p) => document.getElementById('status').textContent.startsWith(p) || " + asking, arg=prefix, timeout=timeout)
    if page.evaluate("() => " + asking):
        sign(page)
    page.wait_for_function("(p) => document.getElementById('status').textContent.startsWith(p)", arg=prefix,
                           timeout=timeout)


def draw_stroke(page):
    """Draw a line with the pen in the axial view, away from the lesion.

    Returns the world (RAS+ mm) points NiiVue maps the stroke's ends to.
    """
    page.click("button[data-slice='0']")  # axial
    page.click("button.verdict[data-verdict='edited']")
    # Function form: a string expression would need eval, which the page's CSP forbids.
    page.wait_for_function("() => window.khe.editing === true")
    box = page.locator("#gl").bounding_box()
    cx, cy, h = box["width"] / 2, box["height"] / 2, box["height"]
    ends = [(cx - 0.3 * h, cy - 0.2 * h), (cx - 0.3 * h, cy + 0.2 * h)]
    mm = []
    for x, y in ends:
        frac, world = page.evaluate(
            """([x, y]) => {
                const nv = window.khe.nv;
                const frac = nv.canvasPos2frac([x * window.devicePixelRatio, y * window.devicePixelRatio]);
                return [Array.from(frac), Array.from(nv.frac2mm(frac)).slice(0, 3)];
            }""",
            [x, y],
        )
        assert all(0.02 < f < 0.98 for f in frac), frac  # inside the image
        mm.append(world)
    page.mouse.move(box["x"] + ends[0][0], box["y"] + ends[0][1])
    page.mouse.down()
    for t in np.linspace(0, 1, 25)[1:]:
        page.mouse.move(box["x"] + ends[0][0], box["y"] + ends[0][1] + t * (ends[1][1] - ends[0][1]))
    page.mouse.up()
    return np.asarray(mm)


def check_edited_mask(results, code, read, drawn_mm):
    case_img = nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    proposed = np.asarray(nib.load(results / "qa" / "R1" / f"{code}_mask.nii.gz").dataobj) != 0
    edited_img = nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"]))
    assert edited_img.shape == case_img.shape and edited_img.get_data_dtype() == np.uint8
    assert np.allclose(edited_img.affine, case_img.affine, atol=1e-4)
    edited = np.asarray(edited_img.dataobj)
    assert set(np.unique(edited)) <= {0, 1}
    assert np.all(edited[proposed] == 1)  # drawing added to the proposed mask
    new = np.argwhere((edited != 0) & ~proposed)
    assert len(new) >= 5
    # Every added voxel lies on the stroke drawn in world space: in the slice
    # shown (the stroke's z is the crosshair's, maybe on a slice boundary, so
    # within half a 3 mm slice) and within a voxel of the line in plane.
    a, b = (world_to_voxel(end, case_img.affine) for end in drawn_mm)
    assert np.all(np.abs(new[:, 2] - a[2]) <= 0.5 + 1e-3) and abs(a[2] - b[2]) < 1e-3
    t = np.clip((new[:, :2] - a[:2]) @ (b - a)[:2] / np.dot((b - a)[:2], (b - a)[:2]), 0, 1)
    dist = np.linalg.norm(new[:, :2] - (a[:2] + t[:, None] * (b - a)[:2]), axis=1)
    assert dist.max() <= 1.0, dist.max()
    # ... and the stroke's ends are drawn where they were drawn.
    for end in (a, b):
        ijk = np.round(end).astype(int)
        lo, hi = np.maximum(ijk - 1, 0), ijk + 2
        assert edited[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()
    assert read["edited_volume_ml"] == pytest.approx(edited.sum() * abs(np.linalg.det(case_img.affine[:3, :3])) / 1000)


def test_server_refuses_to_start_without_niivue(package, tmp_path):
    results, _ = package
    proc = subprocess.run(
        [sys.executable, "-m", "khe_vol.cli", "qa", "serve", "--results-dir", str(results),
         "--niivue-dir", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2 and "npm ci" in proc.stderr


def test_upload_is_checked_against_the_case_grid(package, tmp_path):
    results, codes = package
    code = codes[("sub-01", "ses-m06")]
    app = create_app(results, "R1", db_path=tmp_path / "reads.sqlite", check_viewer=False)
    client = app.test_client()
    case = nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    headers = {"X-Khe-Vol": "reader"}

    def post(payload, headers=headers, **kw):
        data = {"verdict": "edited", "comment": "", "mask": (io.BytesIO(payload), "drawing.nii")}
        return client.post(f"/api/case/{code}/read", data=data, headers=headers, **kw)

    drawing = np.zeros(case.shape, np.uint8)
    drawing[3:6, 4:7, 5] = 2  # NiiVue pen values are colours: binarised on save
    good = nib.Nifti1Image(drawing, case.affine).to_bytes()
    wrong_shape = nib.Nifti1Image(drawing[:-1], case.affine).to_bytes()
    shifted = case.affine.copy()
    shifted[0, 3] += 1.0
    wrong_place = nib.Nifti1Image(drawing, shifted).to_bytes()

    assert post(good, headers={}).status_code == 403  # no app header: another site's form
    assert post(good, headers=headers | {"Host": "evil.example"}).status_code == 403
    for bad in (wrong_shape, wrong_place, b"not a nifti"):
        resp = post(bad)
        assert resp.status_code == 400 and "Not saved" not in resp.json["error"]
    resp = post(good)
    assert resp.status_code == 200
    assert resp.json["current"]["edited_volume_ml"] == pytest.approx(9 * 3.0 / 1000)
    (stored,) = store.current_reads(tmp_path / "reads.sqlite")
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(stored["edited_mask"]))
    assert np.array_equal(np.asarray(mask.dataobj), (drawing != 0).astype(np.uint8))
    assert np.array_equal(mask.affine, case.affine)
    # Only the package's own files are served.
    assert client.get(f"/files/{code}_t2.nii.gz").status_code == 200
    for url in ("/files/worklist.json", "/files/..%2Fblinding%2Fkey.tsv", "/files/../../blinding/key.tsv"):
        assert client.get(url).status_code == 404
    page = client.get(f"/case/{code}")
    assert "Content-Security-Policy" in page.headers and "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert json.loads(client.get("/api/worklist").data)["n_read"] == 1
    # A rebuilt package with another proposed mask makes the read stale: to be read again.
    proposed = results / "qa" / "R1" / f"{code}_mask.nii.gz"
    mask = nib.load(proposed)
    changed = np.asarray(mask.dataobj).copy()
    changed[0, 0, 0] = 1
    proposed.write_bytes(gzip.compress(nib.Nifti1Image(changed, mask.affine, mask.header).to_bytes(), mtime=0))
    view = client.get("/api/worklist").json
    assert view["n_read"] == 0 and [r["state"] for r in view["rows"] if r["case"]["case_code"] == code] == ["stale"]
    assert "to re-read" in client.get("/").get_data(as_text=True)
