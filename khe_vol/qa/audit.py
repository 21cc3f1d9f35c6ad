"""Leak audit: nothing a reader can see may identify a participant, session, date or arm.

The forbidden tokens come from the unblinding key (participants, sessions),
the series records (original file names) and, optionally, the allocation
table (arms, sites). Everything under ``R/qa/`` is scanned: every path
component, text file contents, NIfTI header text fields and extensions, PNG
text chunks, and every page and API answer the reader app would serve (with
Flask's test client on the real app).

The tokens and how they match: :mod:`khe_vol.qa.leaks`.

Structure
---------
Short numbers (a month ``6``, an interval ``182`` days) cannot be found by
token, so each worklist is also checked field by field
(:func:`worklist_problems`): only the fields listed here may appear, and in
longitudinal reading the grouping must say nothing but which cases belong to
one participant and their order (timepoints 1..n, each follow-up's prior its
T1). A new worklist field fails the audit until it is listed here, once it is
known to reveal nothing.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import struct
import tempfile
import zlib
from pathlib import Path

import nibabel as nib

from khe_vol.qa import DEFAULT_READER_DISPLAY, WORKLIST_NAME, default_db_path, store
from khe_vol.qa.app import create_app
from khe_vol.qa.deidentify import HEADER_TEXT_FIELDS
from khe_vol.qa.key import key_paths
from khe_vol.qa.leaks import Leak, Scanner, study_tokens


def png_text_chunks(payload):
    """Text in a PNG's metadata chunks.

    Returns
    -------
    list of (str, str)
        ``(chunk type, text)`` for tEXt, zTXt, iTXt and eXIf chunks (keyword and
        value together). Compressed text is decompressed.
    """
    if payload[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    out, pos = [], 8
    while pos + 8 <= len(payload):
        length, ctype = struct.unpack(">I4s", payload[pos:pos + 8])
        data = payload[pos + 8:pos + 8 + length]
        pos += 12 + length
        ctype = ctype.decode("latin-1")
        if ctype == "tEXt":
            out.append((ctype, data.decode("latin-1").replace("\0", " ")))
        elif ctype == "zTXt":
            keyword, _, rest = data.partition(b"\0")
            out.append((ctype, keyword.decode("latin-1") + " " + zlib.decompress(rest[1:]).decode("latin-1")))
        elif ctype == "iTXt":
            keyword, _, rest = data.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            lang, _, rest = rest.partition(b"\0")
            tkey, _, text = rest.partition(b"\0")
            if compressed:
                text = zlib.decompress(text)
            out.append((ctype, " ".join(p.decode("utf-8", "replace") for p in (keyword, lang, tkey, text))))
        elif ctype == "eXIf":
            out.append((ctype, data.decode("latin-1")))
        if ctype == "IEND":
            break
    return out


def nifti_text_fields(payload):
    """Header text fields and extension contents of a NIfTI file's bytes (gzip or not).

    Returns
    -------
    list of (str, str)
        ``(field name, text)``; extensions as ``extension <n> (code <c>)``.
    """
    raw = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    klass = nib.Nifti2Image if raw[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Image
    header = klass.from_bytes(raw).header
    out = []
    for name in HEADER_TEXT_FIELDS:
        if name in header:
            out.append((name, bytes(header[name].item()).decode("latin-1").rstrip("\0")))
    for n, ext in enumerate(header.extensions):
        content = ext.get_content()
        text = content.decode("latin-1") if isinstance(content, bytes) else str(content)
        out.append((f"extension {n} (code {ext.get_code()})", text))
    return out


def scan_payload(scanner, where, name, payload, prose=True):
    """Leaks in one file's bytes, by what the file is (``prose``: as :meth:`Scanner.find`)."""
    lower = name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        try:
            fields = nifti_text_fields(payload)
        except (ValueError, OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as exc:
            # An unreadable file cannot be vouched for.
            return [Leak(where, "file", f"unreadable NIfTI ({type(exc).__name__})", "unverifiable")]
        return [leak for field, text in fields for leak in scanner.find(where, f"NIfTI {field}", text)]
    if lower.endswith(".png"):
        try:
            chunks = png_text_chunks(payload)
        except (ValueError, zlib.error, struct.error) as exc:
            return [Leak(where, "file", f"unreadable PNG ({exc})", "unverifiable")]
        return [leak for ctype, text in chunks for leak in scanner.find(where, f"PNG {ctype} chunk", text)]
    # Anything else is read as text: what a reader could open in an editor.
    return scanner.find(where, "content", payload.decode("utf-8", "replace"), strict=False, prose=prose)


def scan_files(scanner, results_dir):
    """Leaks in names and contents of every file under ``R/qa/``."""
    results_dir = Path(results_dir)
    qa = results_dir / "qa"
    leaks = []
    for path in sorted(qa.rglob("*")):
        rel = path.relative_to(results_dir).as_posix()
        for part in path.relative_to(qa).parts:
            leaks += scanner.find(rel, "path component", part)
        if path.is_file():
            leaks += scan_payload(scanner, rel, path.name, path.read_bytes())
    return leaks


#: Fields a worklist may hold (top level, per case, per overlay); see :func:`worklist_problems`.
WORKLIST_FIELDS = {"format", "reader", "n_cases", "verdicts", "cases", "display"}
CASE_FIELDS = {"position", "case_code", "image", "proposed_mask", "has_proposed_mask", "needs_seed",
               "automatic_volume_ml", "qc_montage", "overlays", "review_reasons"}
OVERLAY_FIELDS = {"label", "verdict", "volume_ml", "mask"}
#: Added in longitudinal reading only.
LONGITUDINAL_FIELDS = {"reading_mode", "participants"}
LONGITUDINAL_CASE_FIELDS = {"participant", "timepoint", "n_timepoints", "prior_case"}
_PARTICIPANT_CODE_RE = re.compile(r"P-[A-Z][0-9A-Z]{5}")


def worklist_problems(worklist, where):
    """What a worklist holds beyond the fields known to reveal nothing, or a grouping that says more than order.

    Parameters
    ----------
    worklist : dict
        A ``worklist.json``.
    where : str
        Its path, for the messages.

    Returns
    -------
    list of str
    """
    problems = []
    longitudinal = worklist.get("reading_mode") == "longitudinal"
    allowed = WORKLIST_FIELDS | (LONGITUDINAL_FIELDS if longitudinal else set())
    case_allowed = CASE_FIELDS | (LONGITUDINAL_CASE_FIELDS if longitudinal else set())

    def unknown(what, fields, known):
        extra = sorted(set(fields) - known)
        if extra:
            problems.append(f"{where}: {what} has field(s) the audit does not know: {', '.join(extra)} "
                            "(list a new field in khe_vol/qa/audit.py once it is known to reveal nothing)")

    unknown("the worklist", worklist, allowed)
    # How images are shown: switches only (a string there could carry anything).
    display = worklist.get("display", {})
    if not isinstance(display, dict) or not all(isinstance(v, bool) for v in display.values()):
        problems.append(f"{where}: display holds something other than on/off switches: {display!r}")
    else:
        unknown("the display settings", display, set(DEFAULT_READER_DISPLAY))
    if "reading_mode" in worklist and not longitudinal:
        problems.append(f"{where}: reading_mode {worklist['reading_mode']!r} is not a known mode")
    cases = worklist.get("cases", [])
    for c in cases:
        unknown(f"case {c.get('case_code')}", c, case_allowed)
        for o in c.get("overlays", []):
            unknown(f"an overlay of case {c.get('case_code')}", o, OVERLAY_FIELDS)
    if not longitudinal:
        return problems
    by_code = {c["case_code"]: c for c in cases}
    grouped = []
    for g in worklist.get("participants", []):
        label, codes = g.get("participant", ""), g.get("cases", [])
        unknown(f"participant group {label}", g, {"participant", "cases"})
        if not _PARTICIPANT_CODE_RE.fullmatch(str(label)):
            problems.append(f"{where}: participant label {label!r} is not a blinded code (P- and 6 letters/digits)")
        grouped += codes
        for t, code in enumerate(codes, start=1):
            c = by_code.get(code)
            if c is None:
                problems.append(f"{where}: participant group {label} lists {code}, which is not a case")
                continue
            expected = {"participant": label, "timepoint": t, "n_timepoints": len(codes),
                        "prior_case": None if t == 1 else codes[0]}
            wrong = sorted(k for k, v in expected.items() if c.get(k) != v)
            if wrong:
                problems.append(f"{where}: case {code} says more (or other) than its place T{t} of {len(codes)} "
                                f"in group {label}: {', '.join(wrong)}")
    if sorted(grouped) != sorted(by_code):
        problems.append(f"{where}: the participant groups do not hold every case exactly once")
    return problems


def key_placement_problems(results_dir, keys):
    """No key (or a copy of one) may be anywhere under ``R/qa/``."""
    results_dir = Path(results_dir)
    key_files = [Path(k) for k in keys] + [Path(k).with_suffix(".json") for k in keys]
    problems = []
    qa = (results_dir / "qa").resolve()
    for kf in key_files:
        if qa in kf.resolve().parents:
            problems.append(f"{kf}: the unblinding key is inside qa/")
    key_bytes = {kf.read_bytes() for kf in key_files if kf.is_file()}
    for path in sorted((results_dir / "qa").rglob("*")):
        if path.is_file() and (path.name in {k.name for k in key_files} or path.read_bytes() in key_bytes):
            problems.append(f"{path.relative_to(results_dir).as_posix()}: a copy of the unblinding key is inside qa/")
    return problems


def _copy_db(src, dst):
    """Copy a reads database through SQLite's backup API (never writes to ``src``)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def _get_urls(app, worklist):
    """Every GET URL of the app, expanded over the worklist's codes and files."""
    codes = [c["case_code"] for c in worklist["cases"]]
    names = sorted({n for c in worklist["cases"] for n in [c["image"], c["qc_montage"], c["proposed_mask"]]
                    + [o["mask"] for o in c["overlays"]] if n})
    urls = []
    for rule in app.url_map.iter_rules():
        if "GET" not in rule.methods or rule.endpoint in ("static", "niivue_js"):
            continue
        args = set(rule.arguments)
        if not args:
            urls.append(rule.rule)
        elif args == {"code"}:
            urls += [rule.rule.replace("<code>", c) for c in codes]
        elif args == {"name"}:
            urls += [rule.rule.replace("<name>", n) for n in names]
        # Routes with other arguments (edited masks by revision) are read by scanning their list below.
    return urls


def scan_pages(scanner, results_dir, reader, db_path=None):
    """Leaks in every page and API answer the reader app serves.

    Uses the reader's real reads (copied, never modified) when the database
    exists, so what a reader typed into comments is audited too.
    """
    leaks = []
    db_path = Path(db_path) if db_path else default_db_path(results_dir, reader)
    with tempfile.TemporaryDirectory(prefix="khe-vol-audit-") as tmp:
        tmp_db = Path(tmp) / "reads.sqlite"
        if db_path.is_file():
            _copy_db(db_path, tmp_db)
        # Each comment on its own too, so a finding names the read to redact (`khe-vol qa redact`).
        for r in store.all_reads(tmp_db):
            if r["comment"]:
                leaks += scanner.find(f"reads of {reader}: case {r['case_code']} revision {r['revision']}", "comment",
                                      r["comment"], strict=False)
        app = create_app(results_dir, reader, db_path=tmp_db, check_viewer=False)
        client = app.test_client()
        worklist = json.loads((Path(results_dir) / "qa" / reader / WORKLIST_NAME).read_text(encoding="utf-8"))
        urls = _get_urls(app, worklist)
        for r in store.current_reads(tmp_db, with_masks=False) + [
                h for c in worklist["cases"] for h in store.read_history(tmp_db, c["case_code"])]:
            if r["verdict"] == "edited":
                urls.append(f"/api/case/{r['case_code']}/revision/{r['revision']}/edited_mask.nii.gz")
        for static in sorted((Path(app.static_folder)).iterdir()):
            urls.append(f"/static/{static.name}")
        for url in sorted(set(urls)):
            response = client.get(url, headers={"Host": "127.0.0.1"})
            where = f"page GET {url} (reader {reader})"
            if response.status_code != 200:
                leaks.append(Leak(where, "response", f"HTTP {response.status_code}", "unverifiable"))
                continue
            leaks += scanner.find(where, "URL", url)
            # The app's own scripts are the same code in every study: an identifier like m1 is not a visit.
            leaks += scan_payload(scanner, where, url.rsplit("/", 1)[-1] if "/files/" in url or url.endswith(
                ".nii.gz") else "page.html", response.get_data(), prose=not url.startswith("/static/"))
    return leaks


def audit(results_dir, allocation_tsv=None, db_dir=None, keys=None):
    """Run every check.

    Parameters
    ----------
    results_dir : path-like
    allocation_tsv : path-like, optional
        ``participant_id``, ``arm`` and optionally ``site`` columns.
    db_dir : path-like, optional
        Folder of the readers' ``<reader>.sqlite`` (default ``R/reads``).
    keys : list of path-like, optional
        Key files (default: every key in ``R/blinding/``).

    Returns
    -------
    leaks : list of Leak
    problems : list of str
        Key placement problems.
    summary : dict
        Counts for the report.
    """
    results_dir = Path(results_dir)
    keys = [Path(k) for k in keys] if keys else key_paths(results_dir)
    tokens = study_tokens(results_dir, allocation_tsv, keys)
    scanner = Scanner(tokens)
    leaks = scan_files(scanner, results_dir)
    readers = sorted(p.name for p in (results_dir / "qa").iterdir() if (p / WORKLIST_NAME).is_file()) \
        if (results_dir / "qa").is_dir() else []
    for reader in readers:
        db = Path(db_dir) / f"{reader}.sqlite" if db_dir else None
        leaks += scan_pages(scanner, results_dir, reader, db)
    # A reader id that looks like a visit ("M1") names the reader, not a session: the folder and the
    # pages carry it by design.
    reader_ids = {r.casefold() for r in readers}
    leaks = [leak for leak in leaks if not (leak.kind == "visit" and leak.token in reader_ids)]
    problems = key_placement_problems(results_dir, keys)
    for reader in readers:
        path = results_dir / "qa" / reader / WORKLIST_NAME
        problems += worklist_problems(json.loads(path.read_text(encoding="utf-8")), path.relative_to(results_dir).as_posix())
    n_files = sum(1 for p in (results_dir / "qa").rglob("*") if p.is_file()) if (results_dir / "qa").is_dir() else 0
    summary = {"tokens": len(tokens), "files": n_files, "readers": readers,
               "kinds": sorted({t.kind for t in tokens})}
    return leaks, problems, summary
