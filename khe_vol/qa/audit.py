"""Leak audit: nothing a reader can see may identify a participant, session, date or arm.

The forbidden tokens come from the unblinding key (participants, sessions),
the series records (original file names) and, optionally, the allocation
table (arms, sites). Everything under ``R/qa/`` is scanned: every path
component, text file contents, NIfTI header text fields and extensions, PNG
text chunks, and every page and API answer the reader app would serve (with
Flask's test client on the real app).

Matching
--------
* Case-insensitive, on whole tokens: a token matches only where it is not
  preceded or followed by a letter or digit. ``_``, ``-``, ``.``, ``/`` and
  spaces separate, so ``01`` is found in ``sub-01_T2w.nii.gz`` and
  ``pt 01``. Case codes and hashes are single unbroken runs of letters and
  digits (codes always start with a letter), so a short id can never be
  found *inside* one: a code can only match a token equal to the whole code.
* Purely numeric tokens (bare participant labels like ``01``, month digits
  like ``06`` from ``m06``) also must not touch a decimal point or comma
  followed or preceded by a digit, so ``12.06 mL`` does not match ``06``.
* In text (file contents and pages, where counts and volumes are printed),
  numeric tokens shorter than 3 digits without a leading zero (``6``,
  ``12``) are not searched: "3 of 12 read" is not a leak. They are searched in
  names, NIfTI text fields, extensions and PNG text, where no number belongs.
* Tokens shorter than 2 characters are never searched alone (``sub-1`` and
  ``ses-1`` still are): a lone letter or digit is everywhere.
* Dates are found by pattern, not token: ``YYYY-MM-DD``, ``YYYYMMDD`` and
  ``DD.MM.YYYY`` (also with ``/``), with plausible months and days, on the same
  whole-token boundaries.

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
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from khe_vol.files import read_text_table, tsv_dict_reader
from khe_vol.qa import DEFAULT_READER_DISPLAY, WORKLIST_NAME, default_db_path, store
from khe_vol.qa.app import create_app
from khe_vol.qa.deidentify import HEADER_TEXT_FIELDS
from khe_vol.qa.key import key_paths, read_key

#: Characters that make a token part of a longer word (so no match).
_WORD = "A-Za-z0-9"

#: Words too common to forbid when they appear in an arm name.
_ARM_STOPWORDS = {"with", "without", "plus", "and", "only", "arm", "group", "standard", "care", "dose"}

_DATE_PATTERNS = (
    r"(?:19|20)\d\d[-/](?:0[1-9]|1[0-2])[-/](?:0[1-9]|[12]\d|3[01])",  # YYYY-MM-DD
    r"(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])",  # YYYYMMDD
    r"(?:0[1-9]|[12]\d|3[01])[./](?:0[1-9]|1[0-2])[./](?:19|20)\d\d",  # DD.MM.YYYY
)
DATE_RE = re.compile(rf"(?<![{_WORD}])(?:{'|'.join(_DATE_PATTERNS)})(?![{_WORD}])")


@dataclass(frozen=True)
class Token:
    """A forbidden string and what it is (participant, session, month, file, arm, site)."""

    text: str
    kind: str


@dataclass(frozen=True)
class Leak:
    """One forbidden string found somewhere a reader can see."""

    where: str
    what: str
    token: str
    kind: str

    def __str__(self):
        return f"{self.where}: {self.what} contains {self.token} ({self.kind})"


def _strip_prefix(text, prefix):
    return text.removeprefix(prefix)


def _file_stems(name):
    """A file name and its stems without each extension (``a_T2w.nii.gz`` -> ``a_T2w.nii``, ``a_T2w``)."""
    out = [name]
    while "." in name.strip("."):
        name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def forbidden_tokens(key_rows, records, allocation_rows=()):
    """The tokens that must not appear anywhere a reader can see.

    Parameters
    ----------
    key_rows : list of dict
        Rows of ``R/blinding/key.tsv``.
    records : list of dict
        The series records the key points to (for original file names).
    allocation_rows : list of dict
        Rows with ``participant_id``, ``arm`` and optionally ``site``.

    Returns
    -------
    list of Token
        Unique by lower-cased text, most specific kind kept.
    """
    tokens = []
    for row in list(key_rows) + list(records):
        pid, sid = row.get("participant_id"), row.get("session_id")
        if pid:
            tokens += [Token(pid, "participant"), Token(_strip_prefix(pid, "sub-"), "participant")]
        if sid:
            label = _strip_prefix(sid, "ses-")
            tokens += [Token(sid, "session"), Token(label, "session")]
            # The month as the label writes it: "m06" -> "06", "month12" -> "12".
            tokens += [Token(digits, "month") for digits in re.findall(r"\d+", label)]
    for rec in records:
        for path in (rec.get("source_file"), rec.get("reader_mask_file")):
            if path:
                tokens += [Token(s, "file name") for s in _file_stems(Path(path).name)]
    for row in allocation_rows:
        for column, kind in (("arm", "arm"), ("site", "site")):
            value = (row.get(column) or "").strip()
            if value and value != "n/a":
                tokens.append(Token(value, kind))
                tokens += [Token(w, kind) for w in re.findall(r"[A-Za-z]{4,}", value)
                           if w.lower() not in _ARM_STOPWORDS]
    unique = {}
    for t in tokens:
        if len(t.text) >= 2:
            unique.setdefault(t.text.lower(), t)
    return sorted(unique.values(), key=lambda t: (-len(t.text), t.text.lower()))


def _token_regex(token):
    body = re.escape(token.text)
    if token.text.isdigit():  # not inside a longer number or a decimal
        return re.compile(rf"(?<![{_WORD}])(?<!\d[.,]){body}(?![{_WORD}])(?![.,]\d)", re.IGNORECASE)
    return re.compile(rf"(?<![{_WORD}]){body}(?![{_WORD}])", re.IGNORECASE)


def _searched_in_text(token):
    text = token.text
    return not (text.isdigit() and len(text) < 3 and not text.startswith("0"))


class Scanner:
    """Finds forbidden tokens and dates in strings.

    Parameters
    ----------
    tokens : list of Token
    """

    def __init__(self, tokens):
        self.strict = [(t, _token_regex(t)) for t in tokens]
        self.text = [(t, r) for t, r in self.strict if _searched_in_text(t)]

    def find(self, where, what, value, strict=True):
        """Leaks in one string (``strict``: also short numbers; for names and header fields)."""
        leaks = []
        for token, regex in self.strict if strict else self.text:
            m = regex.search(value)
            if m:
                leaks.append(Leak(where, what, m.group(0), token.kind))
        for m in DATE_RE.finditer(value):
            leaks.append(Leak(where, what, m.group(0), "date"))
        return leaks


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


def scan_payload(scanner, where, name, payload):
    """Leaks in one file's bytes, by what the file is."""
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
    return scanner.find(where, "content", payload.decode("utf-8", "replace"), strict=False)


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
            leaks += scan_payload(scanner, where, url.rsplit("/", 1)[-1] if "/files/" in url or url.endswith(
                ".nii.gz") else "page.html", response.get_data())
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
    if not keys:
        raise FileNotFoundError(f"{results_dir / 'blinding'}: no unblinding key; build packages with `khe-vol qa package`")
    key_rows = read_key(results_dir, keys)
    records = []
    for path in sorted({r["record_path"] for r in key_rows if r.get("record_path")}):
        try:
            records.append(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            pass  # the key itself still has the ids; the file name tokens of that series are lost
    # As a spreadsheet may have saved it (the arms step reads it the same way).
    allocation = list(tsv_dict_reader(read_text_table(allocation_tsv, "allocation"))) if allocation_tsv else []
    tokens = forbidden_tokens(key_rows, records, allocation)
    scanner = Scanner(tokens)
    leaks = scan_files(scanner, results_dir)
    readers = sorted(p.name for p in (results_dir / "qa").iterdir() if (p / WORKLIST_NAME).is_file()) \
        if (results_dir / "qa").is_dir() else []
    for reader in readers:
        db = Path(db_dir) / f"{reader}.sqlite" if db_dir else None
        leaks += scan_pages(scanner, results_dir, reader, db)
    problems = key_placement_problems(results_dir, keys)
    for reader in readers:
        path = results_dir / "qa" / reader / WORKLIST_NAME
        problems += worklist_problems(json.loads(path.read_text(encoding="utf-8")), path.relative_to(results_dir).as_posix())
    n_files = sum(1 for p in (results_dir / "qa").rglob("*") if p.is_file()) if (results_dir / "qa").is_dir() else 0
    summary = {"tokens": len(tokens), "files": n_files, "readers": readers,
               "kinds": sorted({t.kind for t in tokens})}
    return leaks, problems, summary
