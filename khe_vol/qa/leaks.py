"""Forbidden tokens: what would identify a participant, session, date or arm to a reader.

The tokens come from the unblinding key (participants, sessions), the
series records (original file names) and the study's words
(``R/blinding/study_words.tsv``: arm and site names, written by ``khe-vol qa
package`` from the workflow's allocation and arms, :func:`write_study_words`),
so the reader app and the audit read the same set from the results folder
whatever options either was started with. :class:`Scanner` finds them, and dates, in strings. The leak
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
* Dates are found by pattern, not token: ``YYYY-MM-DD``, ``YYYYMMDD``,
  ``D.M.YYYY`` / ``M/D/YYYY`` (one or two digits, ``.``, ``/`` or ``-``),
  year and month (``2026-12``, ``12/2026``), and month names in their common
  orders (``Dec 1 2026``, ``1st December 2026``, ``December 2026``,
  ``Dec. 1``), with plausible months and days, on the same whole-token
  boundaries.
* Visits are found by pattern too (:data:`VISIT_RE`, kind ``visit``): a visit
  word and a number (``month 6``, ``week-12``, ``visit 2``, ``follow-up 1``,
  ``m6``) or a number and a time unit (``6 months``, ``6-month``): a time
  since baseline says which session a scan is.
* Every string is read as NFKC with format characters removed and
  case-folded before matching (full-width ``ｍ０６`` is ``m06``; a soft hyphen or
  zero-width space hides nothing), and a token matches with any of ``-_./``
  or spaces (up to 3) where it has one, between its letters and its digits,
  and (session, arm and site words) inside its words: ``sub-01`` is also
  ``sub01`` and ``sub 01``, ``baseline`` is also ``base-line``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from khe_vol.files import atomic_write_text, read_text_table, tsv_dict_reader
from khe_vol.qa import key_dir
from khe_vol.qa.key import KEY_FILE_MODE, key_paths, read_key

#: The study's words file in ``R/blinding/``: ``kind`` (arm, site) and ``word`` columns.
STUDY_WORDS_NAME = "study_words.tsv"
_STUDY_WORD_KINDS = ("arm", "site")

#: Characters that make a token part of a longer word (so no match).
_WORD = "A-Za-z0-9"

#: Words too common to forbid when they appear in an arm name.
_ARM_STOPWORDS = {"with", "without", "plus", "and", "only", "arm", "group", "standard", "care", "dose"}

_YEAR = r"(?:19|20)\d\d"
_MONTH_NUM = r"(?:0?[1-9]|1[0-2])"
_DAY_NUM = r"(?:0?[1-9]|[12]\d|3[01])"
_MONTHS = ("jan(?:uary)?", "feb(?:ruary)?", "mar(?:ch)?", "apr(?:il)?", "june?", "july?", "aug(?:ust)?",
           "sep(?:t(?:ember)?)?", "oct(?:ober)?", "nov(?:ember)?", "dec(?:ember)?")
#: A month's name; "may" (also a verb: "1 may be a vessel") only where a year or an ordinal day goes with it.
_MONTH_NAME = rf"(?:{'|'.join(_MONTHS + ('may',))})\.?"
_MONTH_NAME_NOT_MAY = rf"(?:{'|'.join(_MONTHS)})\.?"
_ORDINAL_DAY = rf"{_DAY_NUM}(?:st|nd|rd|th)?"
#: Not a day after all: a size or count follows ("dec 3 mm" is decreased by 3 mm).
_NOT_A_MEASURE = r"(?!\s*(?:mm|cm|ml|cc|%|x)(?![a-z]))"
_NUMERIC_DATE_PATTERNS = (
    rf"{_YEAR}[-/.]{_MONTH_NUM}[-/.]{_DAY_NUM}",  # YYYY-MM-DD (also one-digit month or day)
    r"(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])",  # YYYYMMDD
    rf"{_DAY_NUM}[-/.]{_DAY_NUM}[-/.]{_YEAR}",  # D.M.YYYY and M/D/YYYY
    rf"{_YEAR}[-/](?:0[1-9]|1[0-2])",  # YYYY-MM (not with ".": a number like 2019.05)
    rf"{_MONTH_NUM}/{_YEAR}",  # MM/YYYY
)
_NAMED_DATE_PATTERNS = (
    rf"{_MONTH_NAME}[\s,.]{{1,3}}{_ORDINAL_DAY}[\s,]{{1,3}}{_YEAR}",  # Dec 1 2026, December 1st, 2026
    rf"{_MONTH_NAME_NOT_MAY}[\s,.]{{1,3}}{_ORDINAL_DAY}{_NOT_A_MEASURE}",  # Dec 1, Sept. 3rd
    rf"may\.?[\s,]{{1,3}}{_DAY_NUM}(?:st|nd|rd|th)",  # May 3rd
    rf"(?:the\s+)?{_ORDINAL_DAY}(?:\s+of)?[\s-]{{1,3}}{_MONTH_NAME}[\s,-]{{1,3}}{_YEAR}",  # 1 Dec 2026
    rf"(?:the\s+)?{_DAY_NUM}(?:st|nd|rd|th)(?:\s+of)?[\s-]{{1,3}}{_MONTH_NAME}",  # the 3rd of May
    rf"{_DAY_NUM}[\s-]{{1,3}}{_MONTH_NAME_NOT_MAY}",  # 1 Dec
    rf"{_MONTH_NAME}[\s,.-]{{0,3}}{_YEAR}",  # December 2026, Dec-2026
)
_DATE_END = rf"(?:(?![{_WORD}])|(?=[Tt]\d))"
#: A date on its own or starting an ISO 8601 / DICOM date-time ("2026-12-04T03:00:02Z",
#: "20261204T030002": the T and the time are word characters, yet the date is still a date); numeric or
#: with a month's name.
DATE_RE = re.compile(rf"(?<![{_WORD}])(?:{'|'.join(_NUMERIC_DATE_PATTERNS + _NAMED_DATE_PATTERNS)}){_DATE_END}",
                     re.IGNORECASE)
#: Numeric dates only (for the app's own scripts, whose words are code, not prose).
NUMERIC_DATE_RE = re.compile(rf"(?<![{_WORD}])(?:{'|'.join(_NUMERIC_DATE_PATTERNS)}){_DATE_END}", re.IGNORECASE)

#: Separators a token may be written with (up to 3 of them, or none) where it has one.
_SEP = r"[\s_\-./]{0,3}"
_VISIT_WORD = (r"(?:months?|mon|mths?|mos?|weeks?|wks?|days?|years?|yrs?|visits?|sessions?|ses|"
               r"follow[\s_\-]?ups?|fu|time[\s_\-]?points?|tp|base[\s_\-]?line|bl)")
_TIME_UNIT = r"(?:months?|mths?|mos?|weeks?|wks?|years?|yrs?|days?)"
#: A time since baseline, which says which session a scan is: "month 6", "week-12", "visit 2",
#: "m6", "m-06", "6 months", "6-month", "12mo" (and "baseline 2").
VISIT_RE = re.compile(
    rf"(?<![{_WORD}])(?:{_VISIT_WORD}{_SEP}\d{{1,3}}|m[-_]?\d{{1,2}}|\d{{1,3}}{_SEP}{_TIME_UNIT})(?![{_WORD}])",
    re.IGNORECASE)


def normalise(text):
    """``text`` as it is matched: NFKC, format characters (soft hyphen, zero-width space) removed, case-folded.

    Full-width and other compatibility forms become their plain letters and digits (``ｍ０６`` -> ``m06``), so
    a forbidden word cannot pass by being written with other code points.
    """
    text = unicodedata.normalize("NFKC", str(text))
    return "".join(c for c in text if unicodedata.category(c) != "Cf").casefold()


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


#: Kinds of token whose words may be split by a separator ("base-line", "siro limus").
_SPLIT_WORD_KINDS = ("session", "arm", "site")


def _token_body(token):
    """The regex of a token's text: separators optional where it has one, between letters and digits
    and, for :data:`_SPLIT_WORD_KINDS` words of 4 letters or more, between its letters."""
    runs = re.findall(r"[^\W_]+", normalise(token.text))
    if not runs:
        return re.escape(normalise(token.text))
    parts = []
    for run in runs:
        pieces = re.findall(r"\d+|\D+", run)
        out = []
        for piece in pieces:
            if piece.isdigit() or token.kind not in _SPLIT_WORD_KINDS or len(piece) < 4:
                out.append(re.escape(piece))
            else:
                out.append(_SEP.join(re.escape(c) for c in piece))
        parts.append(_SEP.join(out))
    return _SEP.join(parts)


def _token_regex(token):
    body = _token_body(token)
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

    def find(self, where, what, value, strict=True, prose=True):
        """Leaks in one string (``strict``: also short numbers; for names and header fields).

        The string is matched as :func:`normalise` writes it. ``prose``: also
        dates with a month's name and :data:`VISIT_RE` (off only for the app's
        own script files, whose words are code, the same in every study).
        """
        value = normalise(value)
        leaks = []
        for token, regex in self.strict if strict else self.text:
            m = regex.search(value)
            if m:
                leaks.append(Leak(where, what, m.group(0), token.kind))
        for m in (DATE_RE if prose else NUMERIC_DATE_RE).finditer(value):
            leaks.append(Leak(where, what, m.group(0), "date"))
        if prose:
            for m in VISIT_RE.finditer(value):
                leaks.append(Leak(where, what, m.group(0), "visit"))
        return leaks




def study_words_path(results_dir):
    """``R/blinding/study_words.tsv``."""
    return key_dir(results_dir) / STUDY_WORDS_NAME


def read_study_words(results_dir):
    """The study's words as allocation-like rows (``{"arm": word}`` or ``{"site": word}``); [] without the file.

    Raises
    ------
    ValueError
        A file that is not a study words table (naming it).
    """
    path = study_words_path(results_dir)
    if not path.is_file():
        return []
    rows = list(tsv_dict_reader(path.read_text(encoding="utf-8")))
    out = []
    for n, row in enumerate(rows, start=2):
        kind, word = (row.get("kind") or "").strip(), (row.get("word") or "").strip()
        if kind not in _STUDY_WORD_KINDS or not word:
            raise ValueError(f"{path}: line {n} is not a kind (arm or site) and a word")
        out.append({kind: word})
    return out


def write_study_words(results_dir, allocation_tsv=None, arms=()):
    """Write the arm and site names readers must not see to ``R/blinding/study_words.tsv`` (owner-only).

    The words already in the file are kept (a word is never unforbidden by a
    run that was not told it), so the file only grows; delete it to start
    over. The reader app refuses comments with these words and the audit
    flags them, both reading this one file.

    Parameters
    ----------
    results_dir : path-like
    allocation_tsv : path-like, optional
        ``participant_id``, ``arm`` and optionally ``site`` columns.
    arms : sequence of str
        Arm names (the workflow's ``arms``).

    Returns
    -------
    Path
    """
    words = {(kind, value) for row in read_study_words(results_dir) for kind, value in row.items()}
    if allocation_tsv:
        for row in tsv_dict_reader(read_text_table(allocation_tsv, "allocation")):
            for kind in _STUDY_WORD_KINDS:
                value = (row.get(kind) or "").strip()
                if value and value != "n/a":
                    words.add((kind, value))
    words |= {("arm", a.strip()) for a in arms if a and a.strip()}
    path = study_words_path(results_dir)
    text = "kind\tword\n" + "".join(f"{k}\t{w}\n" for k, w in sorted(words) if "\t" not in w and "\n" not in w)
    atomic_write_text(path, text, mode=KEY_FILE_MODE)
    return path


def study_tokens(results_dir, allocation_tsv=None, keys=None):
    """The forbidden tokens of a results folder: its keys, their series records, its study words.

    Parameters
    ----------
    results_dir : path-like
    allocation_tsv : path-like, optional
        ``participant_id``, ``arm`` and optionally ``site`` columns: forbidden
        too, besides ``R/blinding/study_words.tsv`` (:func:`write_study_words`).
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
    return forbidden_tokens(key_rows, records, read_study_words(results_dir) + allocation)
