"""One spreadsheet with every cohort table and its data dictionary: ``khe-vol.xlsx``.

Why .xlsx (Office Open XML, written with openpyxl): an analyst opens it
directly in Excel or LibreOffice, and reads it unchanged into R
(``readxl::read_excel``), Stata (``import excel``), SAS (``PROC IMPORT
DBMS=XLSX``) or pandas. It carries the data dictionary as a sheet beside the
data, where readers see each column's meaning and units. Parquet cannot be
opened in a spreadsheet and has no place for per-column descriptions that a
reader sees; CSV has neither types nor a second sheet. The TSVs and their
JSON dictionaries stay the primary outputs; the workbook is a copy of them.

Layout: one sheet per table, same columns in the same order, numbers stored
as numbers (a column is numeric when every non-missing value is a plain
decimal number), ``n/a`` as an empty cell, header row bold and frozen, an
autofilter; then a ``dictionary`` sheet: table, column, LongName,
Description, Units, Levels (``key: text; key: text``).

Reproducible bytes: the document properties are set to a fixed date
(:data:`FIXED_DATETIME`) and every zip entry gets the same fixed timestamp,
so the same tables give the same file on every run.
"""

from __future__ import annotations

import datetime
import io
import json
import re
import zipfile
from pathlib import Path

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Alignment, Font
from openpyxl.utils import get_column_letter
from openpyxl.writer.excel import ExcelWriter

from khe_vol.files import NA, atomic_write_bytes, read_tsv_table

DICTIONARY_SHEET = "dictionary"
DICTIONARY_COLUMNS = ("table", "column", "LongName", "Description", "Units", "Levels")
#: Creation and modification date written into the workbook (and its zip entries).
FIXED_DATETIME = datetime.datetime(2000, 1, 1, 0, 0, 0)
#: Column widths (characters): at least the header, at most this (longer text wraps in the cell).
MIN_WIDTH, MAX_WIDTH = 8, 60
#: Excel keeps 15 significant digits: longer integers stay text, exactly as written.
MAX_INT_DIGITS = 15

# A plain decimal number as the tables write it; no leading zeros on the integer
# part (an id like "007" is text), no "nan"/"inf" (float() would accept them).
_INT_RE = re.compile(r"[+-]?(?:0|[1-9]\d*)")
_FLOAT_RE = re.compile(r"[+-]?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_SHEET_FORBIDDEN = re.compile(r"[\[\]:*?/\\]")


# ---------------------------------------------------------------- reading


def read_dictionary(tsv_path):
    """The BIDS-style JSON data dictionary beside a TSV (same stem, ``.json``); ``{}`` if none."""
    path = Path(tsv_path).with_suffix(".json")
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object {{column: {{LongName, Description, ...}}}}")
    return data


# ---------------------------------------------------------------- values


def parse_number(text):
    """``int`` or ``float`` of a plain decimal number, else ``None``.

    Parameters
    ----------
    text : str
        A table cell.

    Returns
    -------
    int, float or None
    """
    if _INT_RE.fullmatch(text):
        return int(text) if len(text.lstrip("+-")) <= MAX_INT_DIGITS else None
    if _FLOAT_RE.fullmatch(text):
        return float(text)
    return None


def numeric_columns(header, rows):
    """Indices of columns whose every non-missing value is a number (and that have one)."""
    numeric = []
    for index in range(len(header)):
        values = [row[index] for row in rows if row[index] not in (NA, "")]
        if values and all(parse_number(v) is not None for v in values):
            numeric.append(index)
    return set(numeric)


def cell_values(header, rows):
    """Rows of cell values: numbers in numeric columns, ``None`` for ``n/a``, else text."""
    numeric = numeric_columns(header, rows)
    out = []
    for row in rows:
        out.append([
            None if value in (NA, "") else parse_number(value) if i in numeric else _clean_text(value)
            for i, value in enumerate(row)
        ])
    return out


def _clean_text(text):
    # Control characters are not allowed in the XML of a sheet.
    return ILLEGAL_CHARACTERS_RE.sub(" ", text)


def format_levels(levels):
    """Levels of a categorical column as one cell: ``key: text; key: text``."""
    if not levels:
        return None
    if isinstance(levels, dict):
        return "; ".join(f"{key}: {text}" for key, text in levels.items())
    return "; ".join(str(level) for level in levels)


def dictionary_rows(table, header, dictionary):
    """Dictionary sheet rows of one table: every TSV column, in order.

    Parameters
    ----------
    table : str
        Sheet name of the table.
    header : list of str
        The TSV's columns.
    dictionary : dict
        ``{column: {LongName, Description, Units, Levels}}``; a column
        missing from it gets empty fields, and dictionary entries of columns
        not in the TSV are left out (the sheet describes what is there).

    Returns
    -------
    list of list
        ``[table, column, LongName, Description, Units, Levels]`` per column.
    """
    rows = []
    for column in header:
        entry = dictionary.get(column) or {}
        rows.append([
            table, column, entry.get("LongName"), entry.get("Description"), entry.get("Units"),
            format_levels(entry.get("Levels")),
        ])
    return rows


# ---------------------------------------------------------------- sheets


def check_sheet_name(name, taken):
    """Raise ``ValueError`` unless ``name`` is a valid, new worksheet name."""
    if not name or len(name) > 31 or _SHEET_FORBIDDEN.search(name) or name.startswith("'") or name.endswith("'"):
        raise ValueError(f"sheet name {name!r}: 1-31 characters, none of []:*?/\\ and no leading or trailing '")
    if name.lower() in {t.lower() for t in taken}:
        # Excel compares sheet names case-insensitively.
        raise ValueError(f"sheet name {name!r} is used twice (or is the reserved {DICTIONARY_SHEET!r})")


def _width(values):
    longest = max((len(str(v)) for v in values if v is not None), default=0)
    return min(max(longest + 2, MIN_WIDTH), MAX_WIDTH)


def fill_sheet(ws, header, values, wrap_columns=()):
    """Header (bold, frozen, autofilter), values and column widths of one sheet."""
    ws.append(header)
    for row in values:
        ws.append(row)
    for cell in ws[1]:
        cell.font = Font(bold=True)
    ws.freeze_panes = "A2"
    if values:
        ws.auto_filter.ref = ws.dimensions
    for index, name in enumerate(header, start=1):
        column = [row[index - 1] for row in values]
        ws.column_dimensions[get_column_letter(index)].width = _width([name, *column])
        if name in wrap_columns:
            for cell in ws[get_column_letter(index)][1:]:
                cell.alignment = Alignment(wrap_text=True, vertical="top")
    _force_text(ws)


def _force_text(ws):
    """Text cells stay text: openpyxl would store a string starting with "=" as a formula."""
    for row in ws.iter_rows():
        for cell in row:
            if cell.data_type == "f":
                cell.data_type = "s"


def build_workbook(tables):
    """The workbook of ``tables`` (not yet written).

    Parameters
    ----------
    tables : sequence of (str, path-like)
        ``(sheet_name, tsv_path)`` in sheet order; each TSV's JSON data
        dictionary is read from beside it (same stem, ``.json``).

    Returns
    -------
    openpyxl.Workbook
    """
    wb = Workbook()
    wb.remove(wb.active)
    taken, dictionary = [DICTIONARY_SHEET], []
    for name, tsv_path in tables:
        check_sheet_name(name, taken)
        taken.append(name)
        header, rows = read_tsv_table(tsv_path)
        fill_sheet(wb.create_sheet(name), header, cell_values(header, rows))
        dictionary += dictionary_rows(name, header, read_dictionary(tsv_path))
    fill_sheet(wb.create_sheet(DICTIONARY_SHEET), list(DICTIONARY_COLUMNS), dictionary,
               wrap_columns=("Description", "Levels"))
    props = wb.properties
    props.creator = "khe-vol"
    props.lastModifiedBy = None
    props.created = props.modified = FIXED_DATETIME
    return wb


# ---------------------------------------------------------------- bytes


def workbook_bytes(wb):
    """Reproducible .xlsx bytes of a workbook.

    openpyxl's ``save_workbook`` stamps the modification time with now, and
    zip entries carry the current time: the workbook is written through
    ``ExcelWriter`` (keeping the fixed properties), then each zip entry is
    copied in order with :data:`FIXED_DATETIME`.
    """
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(wb, archive).save()
    return _fix_zip_times(raw.getvalue())


def _fix_zip_times(payload):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_DATETIME.timetuple()[:6])
            fixed.compress_type = zipfile.ZIP_DEFLATED
            fixed.external_attr = 0o644 << 16
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def write_workbook(path, tables):
    """Write the cohort workbook atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.xlsx``.
    tables : sequence of (str, path-like)
        ``(sheet_name, tsv_path)`` in sheet order, e.g.
        ``[("volumes", "results/volumes.tsv"), ("response", "results/response.tsv")]``;
        each TSV with its JSON data dictionary beside it. Sheet names are
        1-31 characters, unique, and not ``dictionary``.
    """
    atomic_write_bytes(path, workbook_bytes(build_workbook(tables)))
