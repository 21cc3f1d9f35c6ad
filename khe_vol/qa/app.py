"""The reader web app: one blinded reader's worklist, viewer and verdicts.

A Flask app bound to 127.0.0.1 that serves only what is in ``R/qa/<reader>/``
(files listed in its worklist, nothing else), the app's own templates and
static files, and NiiVue's prebuilt browser bundle from the repository's
``node_modules`` (``npm ci``). Nothing is loaded from the network: the
Content-Security-Policy allows only this origin. Verdicts go to the reads
store (:mod:`khe_vol.qa.store`), committed before the response.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from flask import Flask, abort, jsonify, render_template, request, send_file

from khe_vol.geometry import voxel_volume_mm3
from khe_vol.nifti import SeriesError, nifti_bytes, open_image
from khe_vol.qa import (
    VERDICT_LABELS,
    VERDICTS,
    WORKLIST_NAME,
    check_reader_id,
    default_db_path,
    reader_dir,
    store,
)
from khe_vol.qa.deidentify import mask_like, same_grid
from khe_vol.review import REVIEW_REASONS

#: NiiVue's self-contained browser bundle, inside the npm package.
NIIVUE_BUNDLE = Path("dist") / "niivue.umd.js"

#: Largest accepted upload (an uncompressed uint8 drawing of a big series), bytes.
MAX_UPLOAD_BYTES = 256 * 2**20

#: Header every state-changing request must carry. A page on another site
#: cannot add it without a CORS preflight, which this app never grants, so
#: no other web page the reader has open can post reads.
CSRF_HEADER = ("X-Khe-Vol", "reader")

#: Only this origin; 'wasm-unsafe-eval' and blob: workers for NiiVue's decoders.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self' data: blob:; worker-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class ViewerMissing(RuntimeError):
    """NiiVue's built JavaScript is not installed."""


def repository_root():
    """The repository root (where ``package.json`` and ``node_modules/`` live)."""
    return Path(__file__).resolve().parents[2]


def find_niivue(niivue_dir=None):
    """The NiiVue package folder holding :data:`NIIVUE_BUNDLE`.

    Raises
    ------
    ViewerMissing
        With the command that installs it.
    """
    folder = Path(niivue_dir) if niivue_dir else repository_root() / "node_modules" / "@niivue" / "niivue"
    if not (folder / NIIVUE_BUNDLE).is_file():
        raise ViewerMissing(
            f"the NiiVue viewer is not installed ({folder / NIIVUE_BUNDLE} is missing); run `npm ci` in "
            f"{repository_root()} (needs Node.js and npm), or pass --niivue-dir to an installed @niivue/niivue"
        )
    return folder


def _sha256(payload):
    return hashlib.sha256(payload).hexdigest()


def validate_edited_mask(upload, case_image_path):
    """Check an uploaded drawing is on the case grid and binarise it.

    Parameters
    ----------
    upload : bytes
        A NIfTI file (gzip or not), e.g. NiiVue's ``saveImage({isSaveDrawing: true})``.
    case_image_path : path-like
        The case's T2 in the reader package.

    Returns
    -------
    mask_gz : bytes
        gzip NIfTI, uint8 0/1, with exactly the case image's header geometry.
    volume_ml : float
        Lesion volume of the mask, mL.

    Raises
    ------
    ValueError
        Not NIfTI, not 3D, or another shape or affine than the case image.
    """
    raw = gzip.decompress(upload) if upload[:2] == b"\x1f\x8b" else upload
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types for foreign bytes
        raise ValueError(f"the uploaded mask is not a NIfTI-1 image ({exc})") from exc
    case_img, case_shape, case_affine, _ = open_image(case_image_path, "series")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    affine = img.header.get_best_affine()
    if not same_grid(shape, affine, case_shape, case_affine):
        raise ValueError(f"the uploaded mask (shape {list(shape)}) is not on the case grid (shape {list(case_shape)}, "
                         "or another position); reload the case and draw again")
    data = np.asarray(img.dataobj).reshape(case_shape) != 0
    volume_ml = float(np.count_nonzero(data)) * voxel_volume_mm3(case_affine) / 1000.0
    return nifti_bytes(mask_like(data, case_img)), volume_ml


def create_app(results_dir, reader, db_path=None, niivue_dir=None, check_viewer=True):
    """The reader app for one reader.

    Parameters
    ----------
    results_dir : path-like
        ``R``; the app serves from ``R/qa/<reader>/`` only.
    reader : str
    db_path : path-like, optional
        Reads database (default ``R/reads/<reader>.sqlite``).
    niivue_dir : path-like, optional
        Installed ``@niivue/niivue`` package (default: the repository's ``node_modules``).
    check_viewer : bool
        Refuse to build the app without NiiVue (the leak audit renders pages
        without it).

    Raises
    ------
    ViewerMissing, FileNotFoundError
    """
    reader = check_reader_id(reader)
    folder = reader_dir(results_dir, reader).resolve()
    if not (folder / WORKLIST_NAME).is_file():
        raise FileNotFoundError(f"{folder / WORKLIST_NAME}: no reader package; build it with `khe-vol qa package`")
    viewer = find_niivue(niivue_dir) if check_viewer else None
    db = Path(db_path) if db_path else default_db_path(results_dir, reader)
    if folder in db.resolve().parents:
        raise ValueError(f"{db}: the reads database must not be inside the reader package {folder}")
    store.connect(db).close()  # create it now: a bad path fails at start, not at the first verdict

    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=MAX_UPLOAD_BYTES, KHE_READER=reader, KHE_DB=str(db))

    def worklist():
        return json.loads((folder / WORKLIST_NAME).read_text(encoding="utf-8"))

    def case_or_404(code):
        cases = worklist()["cases"]
        for i, c in enumerate(cases):
            if c["case_code"] == code:
                return c, (cases[i - 1]["case_code"] if i else None), (
                    cases[i + 1]["case_code"] if i + 1 < len(cases) else None)
        abort(404)

    def proposed_sha(case):
        return _sha256((folder / case["proposed_mask"]).read_bytes()) if case["proposed_mask"] else None

    def read_state(case, current):
        """'unread', 'read' or 'stale' (read on a proposed mask since replaced)."""
        if current is None:
            return "unread"
        return "read" if current["proposed_mask_sha256"] == proposed_sha(case) else "stale"

    def public_read(r):
        """What the page shows of a read (no timestamps: dates never reach a reader's screen)."""
        url = f"/api/case/{r['case_code']}/revision/{r['revision']}/edited_mask.nii.gz"
        return {k: r[k] for k in ("revision", "verdict", "comment", "edited_volume_ml")} | {
            "verdict_label": VERDICT_LABELS[r["verdict"]],
            "edited_mask_url": url if r["verdict"] == "edited" else None,
        }

    def case_view(code):
        case, prev_code, next_code = case_or_404(code)
        history = [r for r in store.read_history(db, code) if r["reader"] == reader]
        current = history[-1] if history else None
        return {
            "case": case,
            "prev": prev_code,
            "next": next_code,
            "state": read_state(case, current),
            "current": public_read(current) if current else None,
            "history": [public_read(r) for r in history],
            "image_url": f"/files/{case['image']}",
            "proposed_mask_url": f"/files/{case['proposed_mask']}" if case["proposed_mask"] else None,
            "qc_url": f"/files/{case['qc_montage']}",
            "overlays": [o | {"url": f"/files/{o['mask']}" if o["mask"] else None} for o in case["overlays"]],
        }

    def worklist_view():
        wl = worklist()
        current = {r["case_code"]: r for r in store.current_reads(db, with_masks=False) if r["reader"] == reader}
        rows = []
        for c in wl["cases"]:
            cur = current.get(c["case_code"])
            rows.append({"case": c, "state": read_state(c, cur), "current": public_read(cur) if cur else None})
        n_read = sum(1 for r in rows if r["state"] == "read")
        return {"reader": reader, "rows": rows, "n_read": n_read, "n_cases": len(rows)}

    @app.before_request
    def only_local_names():
        # A DNS-rebinding page would arrive with its own host name.
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") else "[::1]"
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            abort(403)

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index():
        return render_template("worklist.html", **worklist_view())

    @app.get("/case/<code>")
    def case_page(code):
        view = case_view(code)
        return render_template("case.html", view=view, verdicts=VERDICTS, verdict_labels=VERDICT_LABELS,
                               reader=reader, review_reasons=REVIEW_REASONS)

    @app.get("/api/worklist")
    def api_worklist():
        return jsonify(worklist_view())

    @app.get("/api/case/<code>")
    def api_case(code):
        return jsonify(case_view(code))

    @app.get("/files/<name>")
    def files(name):
        allowed = set()
        for c in worklist()["cases"]:
            allowed |= {c["image"], c["qc_montage"], c["proposed_mask"]} | {o["mask"] for o in c["overlays"]}
        # Only names the worklist lists, and only directly inside the package.
        if name not in allowed - {None} or (folder / name).resolve().parent != folder:
            abort(404)
        mimetype = "image/png" if name.endswith(".png") else "application/octet-stream"
        return send_file(folder / name, mimetype=mimetype, max_age=0, etag=False, last_modified=None)

    @app.get("/api/case/<code>/revision/<int:revision>/edited_mask.nii.gz")
    def edited_mask(code, revision):
        case_or_404(code)
        payload = store.edited_mask_bytes(db, code, revision)
        if payload is None:
            abort(404)
        return app.response_class(payload, mimetype="application/octet-stream")

    @app.post("/api/case/<code>/read")
    def submit(code):
        if request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
            abort(403)
        case, _, _ = case_or_404(code)
        verdict = request.form.get("verdict", "")
        if verdict not in VERDICTS:
            return jsonify(error=f"unknown verdict {verdict!r}"), 400
        comment = request.form.get("comment", "")[:5000]
        mask_gz = volume_ml = None
        if verdict == "edited":
            upload = request.files.get("mask")
            if upload is None:
                return jsonify(error="an edited verdict needs the edited mask"), 400
            try:
                mask_gz, volume_ml = validate_edited_mask(upload.read(), folder / case["image"])
            except (ValueError, SeriesError, OSError) as exc:
                return jsonify(error=str(exc)), 400
        # Committed (fsynced) before we answer: what the browser shows as saved is saved.
        store.record_read(db, reader, code, verdict, comment, edited_mask=mask_gz, edited_volume_ml=volume_ml,
                          proposed_mask_sha256=proposed_sha(case))
        return jsonify(case_view(code))

    app.config["KHE_NIIVUE_DIR"] = str(viewer) if viewer else None

    @app.get("/vendor/niivue.umd.js")
    def niivue_js():
        if viewer is None:
            abort(404)
        return send_file(viewer / NIIVUE_BUNDLE, mimetype="text/javascript", max_age=0)

    return app


def serve(app, port):
    """Run the app until interrupted, on 127.0.0.1 only: the package must not be reachable from the network."""
    app.run(host="127.0.0.1", port=port, debug=False, use_reloader=False, threaded=True)
