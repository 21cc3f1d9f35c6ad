"""Forbidden tokens: what would identify a participant, session, date or arm to a reader.

The tokens come from the unblinding key (participants, sessions), the
series records (original file names) and, optionally, the allocation table
(arms, sites). :class:`Scanner` finds them, and dates, in strings. The leak
audit (:mod:`khe_vol.qa.audit`) scans everything a reader can see with it;
the reader app checks a comment with it before saving, so no reader input
can make the audit fail.

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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from khe_vol.files import read_text_table, tsv_dict_reader
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
#: A date on its own or starting an ISO 8601 / DICOM date-time ("2026-12-04T03:00:02Z",
#: "20261204T030002": the T and the time are word characters, yet the date is still a date).
DATE_RE = re.compile(rf"(?<![{_WORD}])(?:{'|'.join(_DATE_PATTERNS)})(?:(?![{_WORD}])|(?=[Tt]\d))")


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




def study_tokens(results_dir, allocation_tsv=None, keys=None):
    """The forbidden tokens of a results folder: its keys, their series records, the allocation.

    Parameters
    ----------
    results_dir : path-like
    allocation_tsv : path-like, optional
        ``participant_id``, ``arm`` and optionally ``site`` columns.
    keys : list of path-like, optional
        Key files (default: every key in ``R/blinding/``).

    Returns
    -------
    list of Token

    Raises
    ------
    FileNotFoundError
        No unblinding key.
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
    return forbidden_tokens(key_rows, records, allocation)
