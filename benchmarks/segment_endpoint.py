"""Latency of the reader app's segment endpoint (``POST /api/case/<code>/segment``).

A reader package of one synthetic 320x320x40 series (0.55 x 0.55 x 4 mm, a
30 mL lesion beside a fluid collection) with no proposed mask; the app is
called through Flask's test client, as a browser's requests reach it. The
first click (the seed) is timed on fresh apps, after the prepare request the
case page sends when it opens (bias correction of the series, while the
reader looks), and without it (the server loads the case and segments from
scratch); refinement clicks (includes in the lesion and the
fluid, an exclude, undo/redo: one request each, the server's kept session)
on one app; and a reader's box (the learned engine) with clicks after it.
Wall-clock seconds per request; printed, never a test.

``page_open`` times the first click as a reader meets it: the case page is
opened (``GET /case/<code>``), its prepare request starts (t = 0), and the
reader clicks at t = 0.5 s, while the prepare is still running; the figure is
the click's answer, seconds from t = 0 (both cases: the seeded one, and the
one whose proposed mask is the start). Requests run on their own threads, as
waitress serves them.

``--browser`` times the same in Debian's Chromium against ``khe-vol qa serve``
(the tests' harness, :func:`tests.test_qa_app.reader_browser`): seconds from
opening the case page to the image shown, and to the first click's mask shown
(the click 0.5 s after the page started its prepare).

    PYTHONPATH=. python benchmarks/segment_endpoint.py [--first-trials 5] [--page-open-only] [--browser]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from khe_vol.cli import main  # noqa: E402
from khe_vol.geometry import voxel_to_world  # noqa: E402
from khe_vol.nifti import load_series  # noqa: E402
from khe_vol.qa.app import create_app  # noqa: E402
from khe_vol.qa.key import read_key  # noqa: E402
from khe_vol.segmentation.seeded import segment_from_seed  # noqa: E402
from tests.qa_cohort import write_phantom_cases  # noqa: E402


def timed_post(client, code, clicks):
    body = json.dumps({"clicks": [{"kind": k, "ras_mm": [float(v) for v in mm]} for k, mm in clicks]})
    started = time.perf_counter()
    resp = client.post(f"/api/case/{code}/segment", data=body, content_type="application/json",
                       headers={"X-Khe-Vol": "reader"})
    seconds = time.perf_counter() - started
    if resp.status_code != 200:
        raise SystemExit(f"segment failed ({resp.status_code}): {resp.get_data(as_text=True)}")
    return seconds, float(resp.headers["X-Volume-Ml"])


def percentiles(values):
    return {"n": len(values), "p50_s": round(float(np.percentile(values, 50)), 3),
            "p90_s": round(float(np.percentile(values, 90)), 3), "max_s": round(float(np.max(values)), 3)}


CLICK_AT_S = 0.5  # when the reader clicks, seconds after the page's prepare request starts


def page_open_timing(results, code, click, db):
    """Open the case page, start its prepare, click at :data:`CLICK_AT_S`: seconds of each step."""
    app = create_app(results, "R1", db_path=db, check_viewer=False)
    started = time.perf_counter()
    page = app.test_client().get(f"/case/{code}")
    if page.status_code != 200:
        raise SystemExit(f"case page failed ({page.status_code})")
    page_s = time.perf_counter() - started
    t0 = time.perf_counter()
    prepared = {}

    def prepare():
        resp = app.test_client().post(f"/api/case/{code}/prepare", headers={"X-Khe-Vol": "reader"})
        prepared.update(status=resp.status_code, seconds=time.perf_counter() - t0)

    worker = threading.Thread(target=prepare)
    worker.start()
    time.sleep(max(0.0, t0 + CLICK_AT_S - time.perf_counter()))
    click_seconds, volume = timed_post(app.test_client(), code, [click])
    answer_s = time.perf_counter() - t0
    worker.join()
    if prepared["status"] != 204:
        raise SystemExit(f"prepare failed ({prepared['status']})")
    return {"page_s": round(page_s, 3), "prepare_s": round(prepared["seconds"], 3),
            "click_wait_s": round(click_seconds, 3), "answer_from_prepare_start_s": round(answer_s, 3),
            "volume_ml": round(volume, 3)}


def page_open_timings(results, codes, scene, tmp, trials):
    """:func:`page_open_timing` of the seeded case and the proposed-mask case, ``trials`` each."""
    out = {}
    clicks = {"seeded": ("include", scene["seed_ras_mm"]), "proposed_mask": ("include", scene["more_seeds_ras_mm"][0])}
    for name, code in codes.items():
        runs = [page_open_timing(results, code, clicks[name], tmp / f"open-{name}-{t}.sqlite") for t in range(trials)]
        out[name] = {"runs": runs, "answer_from_prepare_start": percentiles(
            [r["answer_from_prepare_start_s"] for r in runs])}
    return out


def package_cases(tmp):
    """The 320x320x40 package: ``(results, {"seeded": code, "proposed_mask": code}, scene)``."""
    records, scene = write_phantom_cases(tmp, shape=(320, 320, 40), voxel_mm=(0.55, 0.55, 4.0),
                                         lesion_volume_ml=30.0)
    results = Path(tmp) / "results"
    if main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "1",
             *map(str, records)]) != 0:
        raise SystemExit("packaging failed")
    codes = {("seeded" if r["participant_id"] == "sub-01" else "proposed_mask"): r["case_code"]
             for r in read_key(results) if r["case_code"]}
    return results, codes, scene


def run(first_trials, page_open_only=False):
    with tempfile.TemporaryDirectory() as tmp:
        results, codes, scene = package_cases(tmp)
        page_open = page_open_timings(results, codes, scene, Path(tmp), first_trials)
        if page_open_only:
            return {"series": "320x320x40, 0.55x0.55x4 mm", "click_at_s": CLICK_AT_S, "page_open": page_open}
        code = codes["seeded"]
        seed = ("include", scene["seed_ras_mm"])
        cold, prepare, first = [], [], []
        for trial in range(first_trials):
            app = create_app(results, "R1", db_path=Path(tmp) / f"cold{trial}.sqlite", check_viewer=False)
            cold.append(timed_post(app.test_client(), code, [seed])[0])
            # As a reader meets it: the page asks the server to prepare when it opens.
            app = create_app(results, "R1", db_path=Path(tmp) / f"reads{trial}.sqlite", check_viewer=False)
            started = time.perf_counter()
            resp = app.test_client().post(f"/api/case/{code}/prepare", headers={"X-Khe-Vol": "reader"})
            prepare.append(time.perf_counter() - started)
            if resp.status_code != 204:
                raise SystemExit(f"prepare failed ({resp.status_code}): {resp.get_data(as_text=True)}")
            first.append(timed_post(app.test_client(), code, [seed])[0])
        client = app.test_client()  # its session is prepared: every further request is a refinement
        clicks = [seed]
        plan = [("include", mm) for mm in scene["more_seeds_ras_mm"][:4]] + [
            ("include", scene["fluid_ras_mm"]), ("exclude", scene["fluid_deep_ras_mm"])] + [
            ("include", mm) for mm in scene["more_seeds_ras_mm"][4:]]
        refine, volumes = [], []
        for click in plan:
            clicks.append(click)
            seconds, volume = timed_post(client, code, clicks)
            refine.append(seconds)
            volumes.append(volume)
        for _ in range(3):  # undo, redo
            for step in (clicks[:-1], clicks):
                refine.append(timed_post(client, code, step)[0])
        box = box_timings(results, code, scene, Path(tmp))
    return {"series": "320x320x40, 0.55x0.55x4 mm", "click_at_s": CLICK_AT_S, "page_open": page_open,
            "first_click": percentiles(first),
            "page_prepare": percentiles(prepare), "first_click_unprepared": percentiles(cold),
            "refinement_click": percentiles(refine), "volumes_ml": volumes,
            "true_lesion_ml": round(scene["lesion_ml"], 3), "box": box}


def box_timings(results, code, scene, tmp):
    """A reader's box (the classical lesion's bounding box, 2 voxels wider) on a fresh prepared app,
    the same box a voxel wider (slices already encoded), then clicks steering its mask."""
    image = load_series(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    idx = np.argwhere(segment_from_seed(image.data, image.affine, scene["seed_ras_mm"])[0])
    app = create_app(results, "R1", db_path=tmp / "box.sqlite", check_viewer=False)
    client = app.test_client()
    client.post(f"/api/case/{code}/prepare", headers={"X-Khe-Vol": "reader"})
    seconds, volumes, steer = [], [], []
    for pad in (2, 3):
        corners = voxel_to_world(np.array([idx.min(axis=0) - [pad, pad, 0], idx.max(axis=0) + [pad, pad, 0]]),
                                 image.affine)
        box = ("box", [*corners[0], *corners[1]])
        took, volume = timed_post(client, code, [box])
        seconds.append(took)
        volumes.append(volume)
    clicks = [box]
    for click in [("include", mm) for mm in scene["more_seeds_ras_mm"][:3]] + [("exclude", scene["fluid_deep_ras_mm"])]:
        clicks.append(click)
        steer.append(timed_post(client, code, clicks)[0])
    return {"slices": int(idx[:, 2].max() - idx[:, 2].min() + 1), "first_box_s": round(seconds[0], 3),
            "second_box_s": round(seconds[1], 3), "box_volumes_ml": volumes, "clicks_after_box": percentiles(steer)}


def wait_in_page(page, key, timeout_s=120.0):
    """``window.__bench`` once it has ``key`` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        bench = page.evaluate("() => window.__bench || {}")
        if bench.get(key):
            return bench
        time.sleep(0.02)
    raise SystemExit(f"the page never reported {key!r}")


def browser_timings(trials):
    """Open each case in Chromium, click :data:`CLICK_AT_S` after its image is shown: seconds from opening."""
    from tests.test_qa_app import reader_browser

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        results, codes, scene = package_cases(tmp)
        clicks = {"seeded": scene["seed_ras_mm"], "proposed_mask": scene["more_seeds_ras_mm"][0]}
        with reader_browser(results, Path(tmp)) as served:
            page = served.page
            page.set_viewport_size({"width": 1366, "height": 768})
            # On the browser's clock (ms from the navigation): when the page was ready, when the click
            # reached it, when its mask was shown, and the main thread's long tasks (> 200 ms kept).
            page.add_init_script("""(() => {
                window.__bench = { longTasks: [] };
                new PerformanceObserver((list) => list.getEntries().forEach((e) =>
                    window.__bench.longTasks.push([Math.round(e.startTime), Math.round(e.duration)])))
                    .observe({ type: 'longtask', buffered: true });
                // The reader's click, CLICK_AT_S after the page is ready, at the point in the URL's
                // #bench= (scanner mm), on the page's own clock: a pointer press and release on the canvas.
                const target = /#bench=([-0-9.e,]+)/.exec(location.hash);
                function click() {
                    const nv = window.khe.nv;
                    const mm = target[1].split(',').map(Number);
                    nv.scene.crosshairPos = nv.vox2frac(nv.frac2vox(nv.mm2frac(mm, 0, true)));
                    if (!document.getElementById('click-mode').checked) { document.getElementById('click-mode').click(); }
                    nv.drawScene();
                    const canvas = document.getElementById('gl');
                    const r = canvas.getBoundingClientRect();
                    const p = nv.frac2canvasPos(nv.scene.crosshairPos);
                    const at = { clientX: r.left + p[0] / devicePixelRatio, clientY: r.top + p[1] / devicePixelRatio,
                                 button: 0, bubbles: true, pointerType: 'mouse', isPrimary: true };
                    window.__bench.click = performance.now();
                    canvas.dispatchEvent(new PointerEvent('pointerdown', at));
                    canvas.dispatchEvent(new PointerEvent('pointerup', at));
                }
                document.addEventListener('DOMContentLoaded', () => {
                    new MutationObserver(() => {
                        if (document.body.dataset.ready === '1' && !window.__bench.ready) {
                            window.__bench.ready = performance.now();
                            if (target) { setTimeout(click, %d); }
                        }
                    }).observe(document.body, { attributes: true });
                    const volume = document.getElementById('click-volume');
                    if (volume) {
                        new MutationObserver(() => { if (/mL/.test(volume.textContent) && !window.__bench.shown) {
                            window.__bench.shown = performance.now(); } }).observe(volume, { childList: true, characterData: true, subtree: true });
                    }
                });
            })();""" % round(1000 * CLICK_AT_S))
            server_s = {}  # the segment answer's own X-Seconds (in the handler, lock wait included)
            page.on("response", lambda r: server_s.update(segment=r.headers.get("x-seconds"))
                    if r.url.endswith("/segment") else None)
            for name, code in codes.items():
                runs = []
                for _ in range(trials):
                    page.goto(served.base + "/")
                    target = ",".join(f"{float(v):.4f}" for v in clicks[name])
                    page.goto(f"{served.base}/case/{code}#bench={target}", wait_until="commit")
                    bench = wait_in_page(page, "shown")
                    # The browser's own clock (ms from the navigation): when each request went and came back.
                    marks = page.evaluate("""() => Object.fromEntries(performance.getEntriesByType('resource')
                        .filter((e) => /[/](prepare|segment)$/.test(e.name))
                        .map((e) => [e.name.split('/').pop(), [e.startTime, e.responseStart, e.responseEnd]]))""")
                    page.evaluate("() => { window.khe.dropClicks(); }")  # leave without the unsaved-clicks question
                    runs.append({"image_shown_s": round(bench["ready"] / 1000, 3),
                                 "click_s": round(bench["click"] / 1000, 3),
                                 "first_click_answered_s": round(bench["shown"] / 1000, 3),
                                 "requests_ms": {k: [round(v) for v in t] for k, t in marks.items()},
                                 "segment_server_s": float(server_s["segment"]),
                                 "long_tasks_ms": [t for t in bench["longTasks"] if t[1] > 200]})
                out[name] = {"runs": runs, "first_click_from_opening": percentiles(
                    [r["first_click_answered_s"] for r in runs])}
    return {"series": "320x320x40, 0.55x0.55x4 mm", "click_at_s_after_prepare_starts": CLICK_AT_S,
            "chromium": out}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-trials", type=int, default=5)
    parser.add_argument("--page-open-only", action="store_true", help="only the page-open first click")
    parser.add_argument("--browser", action="store_true", help="the page-open first click in Chromium")
    args = parser.parse_args()
    if args.browser:
        print(json.dumps(browser_timings(args.first_trials), indent=2))
    else:
        print(json.dumps(run(args.first_trials, args.page_open_only), indent=2))
