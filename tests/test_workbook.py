"""Analyst workbook: TSV + JSON in, .xlsx read back with openpyxl."""

from __future__ import annotations

import json
import zipfile

import openpyxl
import pytest

from khe_vol.tables import RESPONSE_COLUMNS, VOLUME_COLUMNS
from khe_vol.report.workbook import (
    DICTIONARY_COLUMNS,
    DICTIONARY_SHEET,
    FIXED_DATETIME,
    format_levels,
    parse_number,
    write_workbook,
)

VOLUME_HEADER = ["participant_id", "session_id", "month", "volume_ml", "n_voxels", "method", "status", "message"]
VOLUME_ROWS = [
    ["sub-001", "ses-baseline", "0", "12.345678", "12346", "auto", "ok", "n/a"],
    ["sub-001", "ses-m12", "12", "0.000000", "0", "reader_mask", "ok", "n/a"],
    ["sub-002", "ses-baseline", "0", "n/a", "n/a", "auto", "error", "=sub-002 file truncated"],
]
RESPONSE_HEADER = ["participant_id", "month", "percent_change", "category", "near_threshold", "status"]
RESPONSE_ROWS = [
    ["sub-001", "12", "-100.000", "complete_involution", "0", "ok"],
    ["sub-002", "12", "n/a", "n/a", "n/a", "error"],
]


def write_tsv(path, header, rows, dictionary):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    if dictionary is not None:
        path.with_suffix(".json").write_text(json.dumps(dictionary, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def tables(tmp_path):
    volumes = write_tsv(tmp_path / "volumes.tsv", VOLUME_HEADER, VOLUME_ROWS,
                        {c: VOLUME_COLUMNS[c] for c in VOLUME_HEADER})
    response = write_tsv(tmp_path / "response.tsv", RESPONSE_HEADER, RESPONSE_ROWS,
                         {c: RESPONSE_COLUMNS[c] for c in RESPONSE_HEADER})
    return [("volumes", volumes), ("response", response)]


def sheet_rows(ws):
    return [list(row) for row in ws.iter_rows(values_only=True)]


def test_sheets_keep_columns_and_values_with_numbers_as_numbers(tmp_path, tables):
    out = tmp_path / "khe-vol.xlsx"
    write_workbook(out, tables)
    wb = openpyxl.load_workbook(out)
    assert wb.sheetnames == ["volumes", "response", DICTIONARY_SHEET]
    volumes = sheet_rows(wb["volumes"])
    assert volumes[0] == VOLUME_HEADER
    assert volumes[1] == ["sub-001", "ses-baseline", 0, 12.345678, 12346, "auto", "ok", None]
    assert volumes[2] == ["sub-001", "ses-m12", 12, 0.0, 0, "reader_mask", "ok", None]
    # n/a is an empty cell; a text starting with "=" stays text, not a formula.
    assert volumes[3] == ["sub-002", "ses-baseline", 0, None, None, "auto", "error", "=sub-002 file truncated"]
    assert wb["volumes"]["H4"].data_type == "s"
    for cell in ("C2", "D2", "E2"):
        assert wb["volumes"][cell].data_type == "n"
    response = sheet_rows(wb["response"])
    assert response[0] == RESPONSE_HEADER
    assert response[1] == ["sub-001", 12, -100.0, "complete_involution", 0, "ok"]
    assert response[2] == ["sub-002", 12, None, None, None, "error"]


def test_header_is_bold_and_frozen_and_columns_sized(tmp_path, tables):
    out = tmp_path / "khe-vol.xlsx"
    write_workbook(out, tables)
    wb = openpyxl.load_workbook(out)
    for name in wb.sheetnames:
        ws = wb[name]
        assert ws.freeze_panes == "A2"
        assert all(cell.font.bold for cell in ws[1])
    ws = wb["volumes"]
    widths = {c: ws.column_dimensions[c].width for c in "ABCH"}
    assert widths["A"] >= len("participant_id") and widths["C"] >= 8
    assert widths["H"] >= len("=sub-002 file truncated")


def test_dictionary_sheet_has_a_complete_row_per_column(tmp_path, tables):
    out = tmp_path / "khe-vol.xlsx"
    write_workbook(out, tables)
    rows = sheet_rows(openpyxl.load_workbook(out)[DICTIONARY_SHEET])
    assert rows[0] == list(DICTIONARY_COLUMNS)
    body = rows[1:]
    assert [(r[0], r[1]) for r in body] == (
        [("volumes", c) for c in VOLUME_HEADER] + [("response", c) for c in RESPONSE_HEADER]
    )
    by_key = {(r[0], r[1]): r for r in body}
    assert by_key[("volumes", "volume_ml")][2:5] == ["Lesion volume", VOLUME_COLUMNS["volume_ml"]["Description"], "mL"]
    assert by_key[("volumes", "participant_id")][4] is None  # no units
    levels = by_key[("response", "category")][5]
    assert levels.startswith("growth: increase >= 20%; no_change: ")
    assert levels.count("; ") == 4
    assert all(r[2] and r[3] for r in body)  # every column has a LongName and Description


def test_rewrite_gives_identical_bytes_with_fixed_dates(tmp_path, tables):
    first, second = tmp_path / "a.xlsx", tmp_path / "b.xlsx"
    write_workbook(first, tables)
    write_workbook(second, tables)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        assert {info.date_time for info in archive.infolist()} == {(2000, 1, 1, 0, 0, 0)}
    props = openpyxl.load_workbook(first).properties
    assert props.created == FIXED_DATETIME and props.modified == FIXED_DATETIME
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_table_without_dictionary_and_bad_sheet_names(tmp_path):
    bare = write_tsv(tmp_path / "check.tsv", ["file", "problem"], [["a.nii", "stray"]], None)
    out = tmp_path / "w.xlsx"
    write_workbook(out, [("check", bare)])
    rows = sheet_rows(openpyxl.load_workbook(out)[DICTIONARY_SHEET])
    assert rows[1:] == [["check", "file", None, None, None, None], ["check", "problem", None, None, None, None]]
    for name in ("dictionary", "a/b", "x" * 32, ""):
        with pytest.raises(ValueError, match="sheet name"):
            write_workbook(out, [(name, bare)])
    with pytest.raises(ValueError, match="twice"):
        write_workbook(out, [("check", bare), ("Check", bare)])


def test_mixed_column_stays_text(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", ["code"], [["12"], ["12a"], ["007"]], {"code": {"LongName": "Code"}})
    out = tmp_path / "t.xlsx"
    write_workbook(out, [("t", path)])
    assert sheet_rows(openpyxl.load_workbook(out)["t"]) == [["code"], ["12"], ["12a"], ["007"]]


def test_ragged_tsv_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", ["a", "b"], [["1", "2"], ["3"]], None)
    with pytest.raises(ValueError, match=r"t\.tsv, line 3"):
        write_workbook(tmp_path / "t.xlsx", [("t", path)])


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("-3", -3), ("0.000000", 0.0), ("-22.500", -22.5), ("1e-5", 1e-5),
    ("007", None), ("nan", None), ("inf", None), ("n/a", None), ("1_000", None), (" 1", None), ("", None),
    ("1234567890123456", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value and type(parse_number(text)) is type(value)


def test_format_levels():
    assert format_levels({"1": "yes", "0": "no"}) == "1: yes; 0: no"
    assert format_levels(None) is None
