"""The reader web app: one blinded reader's worklist, viewer and verdicts.

A Flask app, reached only through the reading service's login
(:class:`khe_vol.qa.service.ReadingService`, served by waitress; the leak
audit renders it directly), that serves only what is in ``R/qa/<reader>/``
(files listed in its worklist, nothing else), the app's own templates and
static files, and NiiVue's prebuilt browser bundle from the repository's
``node_modules`` (``npm ci``). Nothing is loaded from the network: the
Content-Security-Policy allows only this origin. Verdicts go to the reads
store (:mod:`khe_vol.qa.store`), committed before the response.

Click segmentation (:mod:`khe_vol.segmentation.interactive`): ``POST
/api/case/<code>/segment`` with ``{"clicks": [...]}`` answers the mask the
clicks make, as gzip NIfTI on the case grid. The server keeps a
:class:`~khe_vol.segmentation.interactive.ClickSession` for the most recent
cases (:class:`CaseSessions`), so a further click or an undo reuses the
prepared region. A read saved with clicks stores the server's own
recomputation of the mask, never a mask the browser sends.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from flask import Flask, abort, jsonify, render_template, request, send_file

from khe_vol.geometry import seed_voxel, voxel_sizes_mm, voxel_volume_mm3
from khe_vol.nifti import SeriesError, load_image, load_series, nifti_bytes, open_image
from khe_vol.qa import (
    COMMENT_MAX_CHARS,
    DEFAULT_READER_DISPLAY,
    VERDICT_LABELS,
    VERDICTS,
    WORKLIST_NAME,
    check_reader_id,
    default_db_path,
    reader_dir,
    store,
)
from khe_vol.qa import accounts
from khe_vol.qa.deidentify import mask_like
from khe_vol.qa.key import key_paths
from khe_vol.qa.leaks import Scanner, study_tokens, study_words_path
from khe_vol.qa.upload import mask_from_upload, max_upload_bytes, read_upload
from khe_vol.review import REVIEW_REASONS
from khe_vol.segmentation.interactive import ClickSession, clicks_from_json

#: NiiVue's self-contained browser bundle, inside the npm package.
NIIVUE_BUNDLE = Path("dist") / "niivue.umd.js"

#: Largest accepted upload (an uncompressed uint8 drawing of a big series), bytes.
MAX_UPLOAD_BYTES = 256 * 2**20

#: Largest accepted list of clicks (a segment request body, or a read's ``clicks`` field), bytes;
#: the engine's most clicks (200) take about 15 kB.
MAX_CLICKS_BYTES = 64 * 1024

#: Largest body of a read's form fields besides the mask, bytes: a 5000-character comment, a 2000-character
#: reason and a 1024-character password at 12 bytes a character (4 UTF-8 bytes, each percent-escaped), the
#: clicks (:data:`MAX_CLICKS_BYTES`, percent-escaped) and the short fields, with room to spare.
FORM_FIELDS_BYTES = 512 * 1024

#: Most parts of a read's multipart form (its fields and the mask are about ten).
FORM_PARTS = 32

#: Largest body of any other request (a login, a logout, preparing a case, a GET), bytes.
SMALL_BODY_BYTES = 64 * 1024


def route_body_limit(method, path):
    """The largest request body a route can need, bytes (checked before a body is read or parsed).

    A read (``POST /api/case/<code>/read``) may carry a drawn mask: at most
    :data:`MAX_UPLOAD_BYTES` plus its fields here, narrowed to the case's own grid
    (:func:`khe_vol.qa.upload.max_upload_bytes`) by the reader app. Clicks to
    segment: :data:`MAX_CLICKS_BYTES`. Anything else: :data:`SMALL_BODY_BYTES`.
    """
    if method == "POST" and path.startswith("/api/case/"):
        if path.endswith("/read"):
            return MAX_UPLOAD_BYTES + FORM_FIELDS_BYTES
        if path.endswith("/segment"):
            return MAX_CLICKS_BYTES
    return SMALL_BODY_BYTES


def body_too_large_message(limit):
    """What a reader is told when a request body is over its route's limit."""
    return (f"the request is larger than this action can need (more than {limit} bytes): nothing was read or "
            "saved; a comment has at most 5000 characters and a mask is saved from the app")


#: Cases whose prepared click segmentation the server keeps (most recently used first out).
SESSION_CACHE_CASES = 4

#: Cases whose image facts (obliquity, windows, voxel volume: a few numbers each) are kept; more than a worklist.
IMAGE_INFO_CACHE_CASES = 1024

#: Header every state-changing request must carry. A page on another site
#: cannot add it without a CORS preflight, which this app never grants, so
#: no other web page the reader has open can post reads.
CSRF_HEADER = ("X-Khe-Vol", "reader")

#: How long a browser keeps the viewer script (its URL carries its content hash), seconds.
VENDOR_MAX_AGE_S = 365 * 24 * 3600

#: A series whose voxel axes lie more than this from the scanner axes is oblique (shown in its
#: own acquisition plane by default), degrees.
OBLIQUE_DEGREES = 1.0

#: What a verdict's electronic signature means (recorded with each signed read in the trail).
SIGNATURE_MEANING = store.SIGNATURE_MEANING

#: Keyboard key of each verdict (shown on its button).
VERDICT_KEYS = {"accept": "A", "edited": "D", "reject": "R", "no_residual_lesion": "0"}

#: Only this origin; 'wasm-unsafe-eval' and blob: workers for NiiVue's decoders.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; connect-src 'self' data: blob:; worker-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


#: The Host header values a loopback server answers (with or without a port).
LOCAL_HOST_NAMES = ("127.0.0.1", "localhost", "[::1]")

_PORT = re.compile(r":[0-9]{1,5}")


def host_allowed(host, names):
    """Whether a request's ``Host`` header names this server exactly.

    Parameters
    ----------
    host : str or None
        The raw header; None when the request had none (refused).
    names : sequence of str
        Allowed host names, lower case; an IPv6 address in brackets (``[::1]``).

    Returns
    -------
    bool
        True only for one of ``names``, optionally followed by ``:port``.
    """
    if not host:
        return False
    host = host.strip().lower()
    for name in names:
        if host == name or (host.startswith(name) and _PORT.fullmatch(host[len(name):])):
            return True
    return False


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
    upload : bytes or file-like
        A NIfTI file (gzip or not), e.g. NiiVue's ``saveImage({isSaveDrawing: true})``; a stream is
        read only up to :func:`khe_vol.qa.upload.max_upload_bytes` of the case.
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
    UploadRefused
        Not a 0/1 NIfTI-1 mask on the case grid (:mod:`khe_vol.qa.upload`),
        found before more than the case's own voxel count is decompressed.
    """
    case_img, case_shape, case_affine, _ = open_image(case_image_path, "series")
    if hasattr(upload, "read"):  # a request's file stream: read no more than a mask of this case can need
        upload = read_upload(upload, case_shape)
    data = mask_from_upload(upload, case_shape, case_affine)
    volume_ml = float(np.count_nonzero(data)) * voxel_volume_mm3(case_affine) / 1000.0
    return nifti_bytes(mask_like(data, case_img)), volume_ml


def oblique_degrees(affine):
    """Largest angle between a voxel axis and the scanner axis nearest it, degrees (0: not oblique)."""
    axes = np.asarray(affine, float)[:3, :3]
    unit = axes / np.linalg.norm(axes, axis=0)
    return float(np.degrees(np.arccos(np.clip(np.abs(unit).max(axis=0), 0.0, 1.0))).max())


def display_windows(data, mask=None):
    """Window/level presets of a case image: robust, never from the maximum alone.

    Parameters
    ----------
    data : ndarray
        The image's (scaled) intensities.
    mask : ndarray of bool, optional
        The proposed mask (the lesion preset centres on its tissue).

    Returns
    -------
    dict
        ``auto`` (0.5th..99.5th percentile of the non-zero voxels: one bright
        vessel or a saturated voxel does not wash the image out), ``lesion``
        (median of the image's tissue .. 99.5th percentile inside the mask:
        lesion against ordinary tissue), ``full`` (min..max); each a
        ``[low, high]`` pair of image intensities.
    """
    values = np.asarray(data, float)
    values = values[np.isfinite(values)]
    full = [float(values.min()), float(values.max())] if values.size else [0.0, 1.0]
    tissue = values[values != 0] if np.count_nonzero(values) > values.size // 10 else values
    if not tissue.size:
        return {"auto": full, "lesion": full, "full": full}
    lo, hi, median = (float(v) for v in np.percentile(tissue, [0.5, 99.5, 50]))
    auto = [lo, hi] if hi > lo else full
    lesion = auto
    if mask is not None and mask.any():
        top = float(np.percentile(np.asarray(data, float)[mask], 99.5))
        if top > median:
            lesion = [median, top]
    return {"auto": auto, "lesion": lesion, "full": full}


def signing_refused(exc):
    """The answer to a refused signature: the reason, and the wrong passwords left before the lockout.

    Parameters
    ----------
    exc : khe_vol.qa.accounts.LoginRefused

    Returns
    -------
    dict
        ``error`` (for the reader's screen), ``signing`` (True: the signature, not the read, was
        refused; the page keeps its dialog open) and ``tries_left`` (int, or None when not a wrong password).
    """
    tries = exc.tries_left
    error = f"not signed: {exc}"
    if tries == 0:
        error += f"; the account is now locked for {accounts.LOCKOUT_SECONDS // 60} minutes"
    elif tries is not None:
        error += (f"; {tries} more wrong password{'s' if tries > 1 else ''} lock{'s' if tries == 1 else ''} "
                  f"the account for {accounts.LOCKOUT_SECONDS // 60} minutes")
    return {"error": error + " (nothing was saved)", "signing": True, "tries_left": tries}


#: Air: at most this fraction of the top of the image's robust window (99.5th percentile of the non-zero voxels).
AIR_FRACTION = 0.1


def air_level(windows):
    """The intensity at or below which a voxel is air.

    Parameters
    ----------
    windows : dict
        :func:`display_windows` of the image (the page's presets, already computed for it).

    Returns
    -------
    float
        :data:`AIR_FRACTION` of the top of the *auto* window (the 99.5th percentile of the
        non-zero voxels): MRI air is noise, a few % of tissue.
    """
    return AIR_FRACTION * float(windows["auto"][1])


def in_body(data, affine, ijk, level):
    """Whether a voxel lies in the body: above the air level, or enclosed by tissue in its acquired slice.

    Only the voxel's own slice (across the coarsest axis of ``affine``) is looked at, so a click is
    checked in milliseconds; dark tissue enclosed by tissue there (bone, tendon, fat-suppressed
    fat) counts as body.

    Parameters
    ----------
    data : (I, J, K) ndarray
    affine : (4, 4) ndarray
        Voxel-to-world RAS+ affine, mm.
    ijk : tuple of int
        The voxel.
    level : float
        :func:`air_level` of the image.

    Returns
    -------
    bool
    """
    axis = int(np.argmax(voxel_sizes_mm(affine)))
    index = [slice(None)] * 3
    index[axis] = int(ijk[axis])
    tissue = np.nan_to_num(np.asarray(data[tuple(index)], float), nan=0.0) > level
    in_plane = tuple(int(v) for a, v in enumerate(ijk) if a != axis)
    return bool(tissue[in_plane] or ndimage.binary_fill_holes(tissue)[in_plane])


def air_click_warnings(clicks, data, affine, level):
    """A reader-facing warning for each include click outside the body (in air), else none.

    Parameters
    ----------
    clicks : sequence of Click
    data : (I, J, K) ndarray
        The case image.
    affine : (4, 4) ndarray
    level : float
        :func:`air_level` of the image.

    Returns
    -------
    list of str
    """
    out = []
    for n, click in enumerate(clicks, start=1):
        if click.kind != "include":
            continue
        ijk = seed_voxel(click.ras_mm, affine, data.shape)
        if ijk is not None and not in_body(data, affine, tuple(ijk), level):
            x, y, z = click.ras_mm
            out.append(f"include click {n} at ({x:.1f}, {y:.1f}, {z:.1f}) mm is in air, outside the body "
                       "(dark background): undo it (Ctrl+Z) unless it is meant")
    return out


class ClicksRefused(ValueError):
    """A reader's clicks cannot make a mask; the message is for the reader's screen."""


class _CaseSession:
    """One case's click session, with the lock that serialises its use (Flask serves threaded)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.session = None
        self.case_img = None
        self.affine = None
        self.data = None  # the image, for the air warning


class CaseSessions:
    """The click sessions of the most recently used cases.

    Parameters
    ----------
    max_cases : int
        Sessions kept; the least recently used goes first (each holds the
        case image and its prepared region, tens of MB for a large series).
    """

    def __init__(self, max_cases=SESSION_CACHE_CASES):
        self.max_cases = max_cases
        self._lock = threading.Lock()
        self._sessions = OrderedDict()

    def get(self, key):
        """The entry for ``key`` (created empty if new), marked most recent."""
        with self._lock:
            entry = self._sessions.get(key)
            if entry is None:
                entry = self._sessions[key] = _CaseSession()
                while len(self._sessions) > self.max_cases:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end(key)
            return entry


def parse_clicks_text(text):
    """Clicks from a JSON text (hostile): a list of ``{"kind", "ras_mm"}``.

    Raises
    ------
    ClicksRefused
        Too long, not JSON, or not a list of valid clicks.
    """
    if len(text) > MAX_CLICKS_BYTES:
        raise ClicksRefused(f"too many clicks (more than {MAX_CLICKS_BYTES} bytes)")
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ClicksRefused(f"the clicks are not valid JSON ({exc.__class__.__name__})") from None
    try:
        return clicks_from_json(items)
    except (ValueError, TypeError) as exc:
        raise ClicksRefused(str(exc)) from None


class CommentRefused(ValueError):
    """A comment the blinding would not let stand; the message is for the reader's screen."""


class CommentChecker:
    """Checks a reader's comment against the study's forbidden tokens before it is saved.

    The tokens are the leak audit's own (:func:`khe_vol.qa.leaks.study_tokens`:
    the keys, their records and ``R/blinding/study_words.tsv``, the arm and
    site names the workflow packaged with), matched as the audit matches page
    text, so a comment that is saved can never make the audit fail. They are
    rebuilt when a key or the study words file changes.

    Parameters
    ----------
    results_dir : path-like
    allocation_tsv : path-like, optional
        Another allocation table whose arm and site names are refused too (not needed for the
        workflow's: its names are in the study words file).
    """

    def __init__(self, results_dir, allocation_tsv=None):
        self.results_dir, self.allocation_tsv = Path(results_dir), allocation_tsv
        self._stamp, self._scanner = None, None
        self._lock = threading.Lock()

    def _current(self):
        keys = key_paths(self.results_dir)
        words = study_words_path(self.results_dir)
        stamp = tuple((str(k), k.stat().st_mtime_ns, k.stat().st_size) for k in keys) + (
            (words.stat().st_mtime_ns, words.stat().st_size) if words.is_file() else None,)
        with self._lock:
            if stamp != self._stamp:
                tokens = study_tokens(self.results_dir, self.allocation_tsv, keys) if keys else []
                self._scanner, self._stamp = Scanner(tokens), stamp
            return self._scanner

    def check(self, comment):
        """The comment, unchanged, or :class:`CommentRefused` naming the problem."""
        if len(comment) > COMMENT_MAX_CHARS:
            # Never cut a reader's words without a word: refuse, say by how much.
            raise CommentRefused(f"the comment has {len(comment)} characters; at most {COMMENT_MAX_CHARS} are kept: "
                                 f"shorten it by {len(comment) - COMMENT_MAX_CHARS} (nothing was saved)")
        leaks = self._current().find("comment", "comment", comment, strict=False)
        if leaks:
            words = ", ".join(sorted({f"'{leak.token}'" for leak in leaks}))
            raise CommentRefused(f"the comment contains {words}: a participant, session, date, arm or file name "
                                 "word that a blinded read must not carry. Rephrase without it (nothing was saved)")
        return comment


def create_app(results_dir, reader, db_path=None, niivue_dir=None, check_viewer=True, allocation_tsv=None,
               allowed_hosts=LOCAL_HOST_NAMES, accounts_db=None):
    """The reader app for one reader.

    On its own (``khe-vol qa serve --reader``) it serves one reader on
    loopback without a login; inside the reading service
    (:class:`khe_vol.qa.service.ReadingService`) it is reached only through
    the service's login and CSRF checks, and signs every verdict.

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
    allocation_tsv : path-like, optional
        The workflow's allocation table: comments naming an arm or site are refused too.
    allowed_hosts : sequence of str
        ``Host`` header values answered (default: loopback names only).
    accounts_db : path-like, optional
        The service's accounts database: every verdict is then an electronic
        signature (the reader's password re-entered, checked with
        :func:`khe_vol.qa.accounts.authenticate`, or behind the service by the
        session's ``environ["khe_vol.sign"]``), and a revision needs a reason.

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
    allowed_hosts = tuple(allowed_hosts)
    signing = accounts_db is not None

    @app.context_processor
    def service_context():
        # Set by the reading service for a logged-in session; absent in the local single-reader mode.
        return {"csrf_token": request.environ.get("khe_vol.csrf_token"), "signing": signing}
    sessions = CaseSessions()
    comments = CommentChecker(results_dir, allocation_tsv)
    app.extensions["khe_vol_click_sessions"] = sessions

    file_cache = {}  # (name, purpose) -> (file stamp, value): a file is read again only when it changes
    file_cache_lock = threading.Lock()

    def from_file(name, purpose, compute):
        """``compute(path)`` of a package file, kept until the file changes (inode, size or mtime)."""
        path = folder / name
        st = path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with file_cache_lock:
            hit = file_cache.get((name, purpose))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = compute(path)
        with file_cache_lock:
            file_cache[(name, purpose)] = (stamp, value)
        return value

    def worklist():
        # Parsed afresh for each caller (they may change it); read from disk only when it changed.
        text = from_file(WORKLIST_NAME, "text", lambda p: p.read_text(encoding="utf-8"))
        return json.loads(text)

    image_infos = OrderedDict()  # (code, file stamps) -> image_info; small, so every case of a worklist
    image_infos_lock = threading.Lock()  # waitress threads share it

    def image_info(case):
        """Obliquity, window presets and voxel volume of a case image (computed once per file version).

        A save answers with the case's view, so without this every save would load and scan the image.
        """
        names = [case["image"]] + ([case["proposed_mask"]] if case["proposed_mask"] else [])
        try:
            key = (case["case_code"],) + tuple((folder / n).stat().st_mtime_ns for n in names)
        except OSError:
            return {"oblique_degrees": 0.0, "windows": None, "voxel_volume_mm3": None}  # the page reports it
        with image_infos_lock:
            if key in image_infos:
                image_infos.move_to_end(key)
                return image_infos[key]
        try:
            img = load_image(folder / case["image"], "series")
            mask = load_image(folder / case["proposed_mask"], "mask").data != 0 if case["proposed_mask"] else None
            info = {"oblique_degrees": round(oblique_degrees(img.affine), 3),
                    "windows": display_windows(img.data, mask if mask is not None and mask.shape == img.data.shape
                                               else None)}
        except (ValueError, OSError):  # SeriesError: the viewer shows its own load error
            info = {"oblique_degrees": 0.0, "windows": None}
        info["voxel_volume_mm3"] = case_voxel_volume_mm3(case)
        with image_infos_lock:
            image_infos[key] = info
            while len(image_infos) > IMAGE_INFO_CACHE_CASES:
                image_infos.popitem(last=False)
        return info

    def next_unread(code):
        """The next case after ``code`` in worklist order (wrapping) that is unread or stale, or None."""
        cases = worklist()["cases"]
        current = {r["case_code"]: r for r in store.current_reads(db, with_masks=False) if r["reader"] == reader}
        at = next((i for i, c in enumerate(cases) if c["case_code"] == code), -1)
        for c in cases[at + 1:] + cases[:max(at, 0)]:
            if c["case_code"] != code and read_state(c, current.get(c["case_code"])) != "read":
                return c["case_code"]
        return None

    def case_or_404(code):
        cases = worklist()["cases"]
        for i, c in enumerate(cases):
            if c["case_code"] == code:
                return c, (cases[i - 1]["case_code"] if i else None), (
                    cases[i + 1]["case_code"] if i + 1 < len(cases) else None)
        abort(404)

    def proposed_sha(case):
        if not case["proposed_mask"]:
            return None
        return from_file(case["proposed_mask"], "sha256", lambda p: _sha256(p.read_bytes()))

    def with_session(case, action):
        """``action(entry)`` on the case's kept click session, created if new, under its lock.

        The start mask is the case's proposed mask when it has one (else the
        first include click is the seed). Raises ClicksRefused with a
        reader-facing message.
        """
        names = [case["image"]] + ([case["proposed_mask"]] if case["proposed_mask"] else [])
        # A rebuilt package (new image or proposed mask) must not reuse the old preparation.
        try:
            stamp = tuple((n, (folder / n).stat().st_mtime_ns, (folder / n).stat().st_size) for n in names)
        except OSError:
            raise ClicksRefused("the case's files are missing from the reader package; reload the worklist") from None
        entry = sessions.get((case["case_code"], stamp))
        with entry.lock:
            if entry.session is None:
                try:
                    image = load_series(folder / case["image"])
                    case_img, _, _, _ = open_image(folder / case["image"], "series")
                    start = None
                    if case["proposed_mask"]:
                        start = load_image(folder / case["proposed_mask"], "mask").data != 0
                    # The volume band is the workflow's business; clicks do without it.
                    session = ClickSession(image.data, image.affine, start, volume_band=False)
                except ValueError as exc:  # SeriesError, SegmentationError
                    # File names never reach a reader's screen (they are case codes, but still).
                    message = str(exc)
                    for n in names:
                        message = message.replace(str(folder / n), "the case").replace(n, "the case")
                    raise ClicksRefused(f"this case cannot be segmented by clicks: {message}") from None
                entry.session, entry.case_img, entry.affine = session, case_img, image.affine
                entry.data = image.data
            try:
                return action(entry)
            except ValueError as exc:  # SegmentationError: a click the engine cannot use
                raise ClicksRefused(str(exc)) from None

    def segment_case(case, clicks, warnings=None):
        """``(mask uint8, info, case nibabel image)`` for a list of clicks on a case.

        ``warnings``: a list that gets a reader-facing line for each include click in air.
        """
        windows = image_info(case)["windows"] if warnings is not None else None

        def action(entry):
            answer = (*entry.session.segment(clicks), entry.case_img)
            if windows:
                warnings.extend(air_click_warnings(clicks, entry.data, entry.affine, air_level(windows)))
            return answer
        return with_session(case, action)

    def read_state(case, current):
        """'unread', 'read' or 'stale' (read on a proposed mask since replaced)."""
        if current is None:
            return "unread"
        return "read" if current["proposed_mask_sha256"] == proposed_sha(case) else "stale"

    def public_read(r):
        """What the page shows of a read (no timestamps: dates never reach a reader's screen)."""
        url = f"/api/case/{r['case_code']}/revision/{r['revision']}/edited_mask.nii.gz"
        return {k: r[k] for k in ("revision", "verdict", "comment", "edited_volume_ml", "clicks")} | {
            "verdict_label": VERDICT_LABELS[r["verdict"]],
            "edited_mask_url": url if r["verdict"] == "edited" else None,
        }

    def prior_view(prior_code):
        """The earlier timepoint shown beside a follow-up (longitudinal reading): its image and final mask.

        The mask is the reader's own final read of that case when there is one
        (an edited mask; none for "no residual lesion"), else the proposed mask.
        """
        prior, _, _ = case_or_404(prior_code)
        history = [r for r in store.read_history(db, prior_code) if r["reader"] == reader]
        current = history[-1] if history else None
        state = read_state(prior, current)
        proposed_url = f"/files/{prior['proposed_mask']}" if prior["proposed_mask"] else None
        if current is not None and current["verdict"] == "edited":
            mask_url, source = public_read(current)["edited_mask_url"], "your edited mask"
        elif current is not None and current["verdict"] == "no_residual_lesion":
            mask_url, source = None, "your read: no residual lesion (no mask)"
        elif proposed_url is None:
            mask_url, source = None, "no mask yet (not seeded)"
        elif current is None:
            mask_url, source = proposed_url, "proposed mask (not read yet)"
        else:
            label = {"accept": "you accepted it", "reject": "you rejected it"}[current["verdict"]]
            mask_url, source = proposed_url, f"proposed mask ({label})"
        if state == "stale" and mask_url is not None and mask_url == proposed_url:
            source = "proposed mask (changed since your read: read it again)"
        # The volume the % change is measured from: the mask shown (none for a rejected or unseeded one).
        if current is not None and current["verdict"] == "edited":
            volume_ml = current["edited_volume_ml"]
        elif current is not None and current["verdict"] == "no_residual_lesion":
            volume_ml = 0.0
        elif current is not None and current["verdict"] == "reject":
            volume_ml = None
        else:
            volume_ml = prior.get("automatic_volume_ml") if proposed_url else None
        return {
            "case_code": prior_code,
            "timepoint": prior["timepoint"],
            "image_url": f"/files/{prior['image']}",
            "mask_url": mask_url,
            "mask_source": source,
            "volume_ml": volume_ml,
            # Its own window presets: a follow-up's intensities (or its empty mask) never set T1's display.
            "windows": image_info(prior)["windows"],
        }

    def case_view(code):
        case, prev_code, next_code = case_or_404(code)
        history = [r for r in store.read_history(db, code) if r["reader"] == reader]
        current = history[-1] if history else None
        info = image_info(case)
        longitudinal = {}
        if "timepoint" in case:  # a longitudinal package; independent cases carry none of this
            longitudinal = {"longitudinal": {
                "participant": case["participant"],
                "timepoint": case["timepoint"],
                "n_timepoints": case["n_timepoints"],
                "prior": prior_view(case["prior_case"]) if case["prior_case"] else None,
            }}
        return longitudinal | {
            "case": case,
            "prev": prev_code,
            "next": next_code,
            "state": read_state(case, current),
            "current": public_read(current) if current else None,
            "history": [public_read(r) for r in history],
            "image_url": f"/files/{case['image']}",
            "proposed_mask_url": f"/files/{case['proposed_mask']}" if case["proposed_mask"] else None,
            # No proposed mask: the first click must be an include inside the lesion (the seed).
            "needs_seed": bool(case.get("needs_seed")) or not case["proposed_mask"],
            "qc_url": f"/files/{case['qc_montage']}",
            "overlays": [o | {"url": f"/files/{o['mask']}" if o["mask"] else None} for o in case["overlays"]],
            "revision": current["revision"] if current else 0,
            "next_unread": next_unread(code),
            "n_cases": len(worklist()["cases"]),
            "display": {**DEFAULT_READER_DISPLAY, **worklist().get("display", {})},
            "comment_max_chars": COMMENT_MAX_CHARS,
            "image_info": {k: v for k, v in info.items() if k != "voxel_volume_mm3"},
            # The live edited volume (edit.js) uses the server's voxel volume, so it equals the saved one.
            "voxel_volume_mm3": info["voxel_volume_mm3"],
        }

    def case_voxel_volume_mm3(case):
        try:
            return voxel_volume_mm3(open_image(folder / case["image"], "series")[2])
        except SeriesError:
            return None  # the viewer cannot show the image either; the page says so

    def worklist_view():
        wl = worklist()
        current = {r["case_code"]: r for r in store.current_reads(db, with_masks=False) if r["reader"] == reader}
        rows = []
        for c in wl["cases"]:
            cur = current.get(c["case_code"])
            rows.append({"case": c, "state": read_state(c, cur), "current": public_read(cur) if cur else None})
        n_read = sum(1 for r in rows if r["state"] == "read")
        first_unread = next((r["case"]["case_code"] for r in rows if r["state"] != "read"), None)
        view = {"reader": reader, "rows": rows, "n_read": n_read, "n_cases": len(rows), "first_unread": first_unread}
        if wl.get("participants"):
            # Longitudinal reading: a participant's timepoints together, T1..Tn.
            by_code = {r["case"]["case_code"]: r for r in rows}
            view["groups"] = [{"participant": g["participant"], "rows": [by_code[c] for c in g["cases"]]}
                              for g in wl["participants"]]
        return view

    @app.before_request
    def only_local_names():
        # A DNS-rebinding page would arrive with its own host name; HTTP/1.0 may send none.
        if not host_allowed(request.headers.get("Host"), allowed_hosts):
            abort(403 if request.headers.get("Host") else 400)

    @app.before_request
    def cap_body():
        # Each body is capped by what its route can need before any of it is read or parsed: a body
        # without a Content-Length is cut at the same limit (413) as it is read.
        limit = route_body_limit(request.method, request.path)
        if request.endpoint == "submit" and request.view_args:
            case = next((c for c in worklist()["cases"] if c["case_code"] == request.view_args.get("code")), None)
            try:
                shape = from_file(case["image"], "shape", lambda p: tuple(nib.load(p).shape)) if case else None
            except (OSError, ValueError, nib.filebasedimages.ImageFileError):
                shape = None  # the route answers for an unreadable case image
            if shape is not None:
                limit = min(limit, max_upload_bytes(shape) + FORM_FIELDS_BYTES)
        request.max_content_length = limit
        request.max_form_memory_size = min(limit, FORM_FIELDS_BYTES)
        request.max_form_parts = FORM_PARTS
        if request.content_length is not None and request.content_length > limit:
            abort(413)

    @app.errorhandler(413)
    def body_too_large(exc):
        return jsonify(error=body_too_large_message(request.max_content_length)), 413

    @app.after_request
    def headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # Everything is private to this reader and may change, except the versioned viewer script.
        if not getattr(response, "khe_immutable", False):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/")
    def index():
        return render_template("worklist.html", **worklist_view())

    @app.get("/case/<code>")
    def case_page(code):
        view = case_view(code)
        return render_template("case.html", view=view, verdicts=VERDICTS, verdict_labels=VERDICT_LABELS,
                               reader=reader, review_reasons=REVIEW_REASONS, niivue_url=niivue_url(),
                               verdict_keys=VERDICT_KEYS)

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
        # SQLite integers end at 2**63 (a larger one would not bind); no case has 2**31 revisions.
        payload = store.edited_mask_bytes(db, code, revision) if revision <= 2**31 else None
        if payload is None:
            return jsonify(error=f"case {code} has no edited mask at revision {revision}"), 404
        return app.response_class(payload, mimetype="application/octet-stream")

    @app.post("/api/case/<code>/read")
    def submit(code):
        if request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
            abort(403)
        case, _, _ = case_or_404(code)
        verdict = request.form.get("verdict", "")
        if verdict not in VERDICTS:
            return jsonify(error=f"unknown verdict {verdict!r}"), 400
        try:
            comment = comments.check(request.form.get("comment", ""))
        except CommentRefused as exc:
            return jsonify(error=str(exc)), 400
        expected = request.form.get("expected_revision")
        if expected is not None and not (expected.isdigit() and len(expected) <= 9):
            return jsonify(error="expected_revision is the case's revision the page showed (0: unread)"), 400
        mask_gz = volume_ml = clicks = None
        upload = request.files.get("mask")
        clicks_text = request.form.get("clicks")
        if (upload is not None or clicks_text is not None) and verdict != "edited":
            return jsonify(error="a mask or clicks go only with the verdict Edited"), 400
        if upload is not None and clicks_text is not None:
            # A pen drawing cannot be recomputed from clicks: one read is one or the other.
            return jsonify(error="send either the clicks or a drawn mask, not both"), 400
        if verdict == "edited" and clicks_text is not None:
            try:
                clicks = parse_clicks_text(clicks_text)
                if not clicks:
                    raise ClicksRefused("there are no clicks to save")
                # The stored mask is the server's own recomputation from the image and the clicks.
                mask, info, case_img = segment_case(case, clicks)
            except ClicksRefused as exc:
                return jsonify(error=str(exc)), 400
            mask_gz, volume_ml = nifti_bytes(mask_like(mask != 0, case_img)), info["volume_ml"]
        elif verdict == "edited":
            if upload is None:
                return jsonify(error="an edited verdict needs the edited mask or the clicks"), 400
            try:
                mask_gz, volume_ml = validate_edited_mask(upload.stream, folder / case["image"])
            except (ValueError, SeriesError, OSError) as exc:
                return jsonify(error=str(exc)), 400
        try:
            # How long the read took (never shown to any reader; summarised per reader by `qa final`).
            seconds, edit_seconds = store.check_read_seconds(request.form.get("seconds_to_verdict"),
                                                             request.form.get("edit_seconds"), verdict)
        except ValueError as exc:
            return jsonify(error=str(exc)), 400
        signature = {}
        if signing:
            # An electronic signature: the reader re-enters the password (a wrong one counts towards lockout).
            reason = request.form.get("reason", "").strip()
            latest = max((r["revision"] for r in store.read_history(db, code) if r["reader"] == reader), default=0)
            if expected is not None and int(expected) != latest:
                return jsonify(error=str(store.RevisionConflict(code, int(expected), latest)), duplicate=True,
                               view=case_view(code)), 409
            if latest and not reason:
                return jsonify(error="a revision of a signed read needs a reason: say why the verdict changes "
                               "(nothing was saved)"), 400
            if len(reason) > store.MAX_REASON_CHARS:
                return jsonify(error=f"the reason has {len(reason)} characters; at most {store.MAX_REASON_CHARS} are "
                               "kept: shorten it (nothing was saved)"), 400
            try:
                reason = comments.check(reason) if reason else None
            except CommentRefused as exc:
                return jsonify(error=str(exc).replace("the comment", "the reason")), 400
            try:
                # Behind the service's login, within the session (a fast check of a password scrypt has
                # already accepted in it, 21 CFR 11.200(a)(1)); a standalone app checks by scrypt each time.
                sign = request.environ.get("khe_vol.sign")
                password = request.form.get("password", "")
                if sign is not None:
                    sign(password)
                else:
                    accounts.authenticate(accounts_db, reader, password)
            except accounts.LoginRefused as exc:
                return jsonify(signing_refused(exc)), 403
            signature = {"signer": reader, "meaning": SIGNATURE_MEANING, "reason": reason}
        # Committed (fsynced) before we answer: what the browser shows as saved is saved.
        try:
            store.record_read(db, reader, code, verdict, comment, edited_mask=mask_gz, edited_volume_ml=volume_ml,
                              proposed_mask_sha256=proposed_sha(case), clicks=clicks, seconds_to_verdict=seconds,
                              edit_seconds=edit_seconds,
                              expected_revision=None if expected is None else int(expected), **signature)
        except store.RevisionConflict as exc:
            # A second post of the same page state (a double click): nothing stored, the saved state returned.
            return jsonify(error=str(exc), duplicate=True, view=case_view(code)), 409
        except (store.ReasonRequired, store.SignatureRequired) as exc:  # a revision of a signed read
            return jsonify(error=f"{exc} (nothing was saved)"), 400
        return jsonify(case_view(code))

    @app.post("/api/case/<code>/prepare")
    def prepare(code):
        """Prepare the case's click session before the first click (the page asks on opening)."""
        if request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
            abort(403)
        case, _, _ = case_or_404(code)
        try:
            with_session(case, lambda entry: entry.session.prepare())
        except ClicksRefused as exc:
            return jsonify(error=str(exc)), 400
        return ("", 204)

    @app.post("/api/case/<code>/segment")
    def segment(code):
        """The mask the posted clicks make: gzip NIfTI on the case grid, or 400 with a readable error."""
        if request.headers.get(CSRF_HEADER[0]) != CSRF_HEADER[1]:
            abort(403)
        case, _, _ = case_or_404(code)
        started = time.perf_counter()
        # Read at most one byte over the limit, whatever Content-Length claims.
        body = request.stream.read(MAX_CLICKS_BYTES + 1)
        try:
            if len(body) > MAX_CLICKS_BYTES:
                raise ClicksRefused(f"too many clicks (more than {MAX_CLICKS_BYTES} bytes)")
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                raise ClicksRefused('the request is not JSON of the form {"clicks": [...]}') from None
            if not isinstance(payload, dict) or set(payload) != {"clicks"}:
                raise ClicksRefused('the request is not JSON of the form {"clicks": [...]}')
            try:
                clicks = clicks_from_json(payload["clicks"])
            except (ValueError, TypeError) as exc:
                raise ClicksRefused(str(exc)) from None
            warnings = []
            mask, info, case_img = segment_case(case, clicks, warnings)
        except ClicksRefused as exc:
            return jsonify(error=str(exc)), 400
        response = app.response_class(nifti_bytes(mask_like(mask != 0, case_img)),
                                      mimetype="application/octet-stream")
        response.headers["X-Volume-Ml"] = repr(float(info["volume_ml"]))
        response.headers["X-N-Clicks"] = str(int(info["n_clicks"]))
        response.headers["X-Start"] = info["start"]
        if warnings:
            # A flag, not a refusal: the reader sees it and undoes the click (or keeps it, if meant).
            response.headers["X-Click-Warning"] = "; ".join(warnings)
        response.headers["X-Seconds"] = f"{time.perf_counter() - started:.3f}"  # wall, this request
        return response

    app.config["KHE_NIIVUE_DIR"] = str(viewer) if viewer else None

    viewer_version = _sha256((viewer / NIIVUE_BUNDLE).read_bytes())[:16] if viewer else None

    def niivue_url():
        """The viewer script's URL, versioned by its content: a browser may keep it for good."""
        return f"/vendor/niivue.umd.js?v={viewer_version}"

    @app.get("/vendor/niivue.umd.js")
    def niivue_js():
        if viewer is None:
            abort(404)
        response = send_file(viewer / NIIVUE_BUNDLE, mimetype="text/javascript", etag=True, conditional=True)
        if request.args.get("v") == viewer_version:
            response.headers["Cache-Control"] = f"public, max-age={VENDOR_MAX_AGE_S}, immutable"
            response.khe_immutable = True
        else:
            response.headers["Cache-Control"] = "no-cache"  # another version's URL: revalidate (ETag)
            response.khe_immutable = True
        return response

    return app

