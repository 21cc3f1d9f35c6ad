"""Blinded reader package and its leak audit, on real files."""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.qa import store
from khe_vol.qa.audit import png_text_chunks
from khe_vol.qa.leaks import Scanner, Token
from khe_vol.qa.codes import case_code
from khe_vol.qa.deidentify import HEADER_TEXT_FIELDS
from khe_vol.qa.key import read_key
from tests.qa_cohort import write_cohort

SEED = "8123456789012345"


@pytest.fixture
def cohort(tmp_path):
    records = write_cohort(tmp_path)
    return tmp_path / "results", [str(r) for r in records]


def build(results, records, *extra, readers=("R1", "R2")):
    argv = ["qa", "package", "--results-dir", str(results), "--seed", SEED, *extra]
    for r in readers:
        argv += ["--reader", r]
    assert main(argv + records) == 0


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def worklist(results, reader):
    return json.loads((results / "qa" / reader / "worklist.json").read_text())


def test_package_deidentifies_and_keeps_data_and_geometry(cohort):
    results, records = cohort
    build(results, records)
    key = {(r["reader"], r["participant_id"], r["session_id"]): r for r in read_key(results)}
    for reader in ("R1", "R2"):
        wl = worklist(results, reader)
        assert wl["n_cases"] == 3 and [c["position"] for c in wl["cases"]] == [1, 2, 3]
        by_code = {c["case_code"]: c for c in wl["cases"]}
        for (rdr, pid, sid), row in key.items():
            if rdr != reader:
                continue
            if (pid, sid) == ("sub-02", "ses-m06"):  # truncated image: no case, the key says why
                assert row["status"] == "no_case" and row["case_code"] is None
                assert "not a readable NIfTI" in row["message"]
                continue
            case = by_code[row["case_code"]]
            assert row["case_code"] == case_code(int(SEED), reader, pid, sid)
            source = nib.load(row["source_file"])
            payload = (results / "qa" / reader / case["image"]).read_bytes()
            # Reproducible gzip: no file name flag, zero mtime.
            assert payload[3] & 0x08 == 0 and payload[4:8] == b"\0\0\0\0"
            raw = gzip.decompress(payload)
            assert pid.encode() not in raw and b"2024" not in raw
            copy = nib.Nifti1Image.from_bytes(raw)
            assert copy.get_data_dtype() == source.get_data_dtype()
            assert np.array_equal(copy.dataobj.get_unscaled(), source.dataobj.get_unscaled())
            assert np.array_equal(copy.get_fdata(), source.get_fdata())
            assert (copy.dataobj.slope, copy.dataobj.inter) == (0.5, 10.0)
            for form in ("get_qform", "get_sform"):
                a, a_code = getattr(copy.header, form)(coded=True)
                b, b_code = getattr(source.header, form)(coded=True)
                assert int(a_code) == int(b_code) == 1 and np.array_equal(a, b)
            for field in HEADER_TEXT_FIELDS:
                if field in copy.header:
                    assert copy.header[field].item() == b""
            assert len(copy.header.extensions) == 0
            if sid == "ses-baseline" and pid == "sub-02":  # error record, loadable image: no proposed mask
                assert case["proposed_mask"] is None and case["automatic_volume_ml"] is None
                assert row["has_proposed_mask"] == "no"
                continue
            mask = nib.load(results / "qa" / reader / case["proposed_mask"])
            original = nib.load(results / "work" / "series" / pid / sid / "mask.nii.gz")
            assert mask.get_data_dtype() == np.uint8 and mask.shape == source.shape
            assert np.array_equal(mask.affine, source.affine)
            assert np.array_equal(np.asarray(mask.dataobj), np.asarray(original.dataobj))
            assert case["automatic_volume_ml"] == pytest.approx(float(row["automatic_volume_ml"]), abs=1e-3)
            png = (results / "qa" / reader / case["qc_montage"]).read_bytes()
            assert png.startswith(b"\x89PNG") and png_text_chunks(png) == []
            # Its words are the case code, the automatic volume and the review codes: nothing else.
            from khe_vol.report.montage import montage_png, montage_tiles

            tiles = montage_tiles(source.get_fdata(), source.affine, np.asarray(original.dataobj) != 0)
            words = [f"automatic volume {case['automatic_volume_ml']:.2f} mL",
                     "review: " + ("; ".join(case["review_reasons"]) or "none")]
            assert png == montage_png(tiles, f"case {case['case_code']}", words)


def test_codes_differ_per_reader_and_rebuild_is_byte_identical(cohort):
    results, records = cohort
    build(results, records)
    before = snapshot(results / "qa") | {f"key/{k}": v for k, v in snapshot(results / "blinding").items()}
    codes = {r: {c["case_code"] for c in worklist(results, r)["cases"]} for r in ("R1", "R2")}
    assert not codes["R1"] & codes["R2"]
    assert all(len(c) == 10 and c[0].isalpha() and c.isalnum() for c in codes["R1"] | codes["R2"])
    # A rebuild (here with the records in another order) gives the same codes and bytes.
    build(results, records[::-1])
    after = snapshot(results / "qa") | {f"key/{k}": v for k, v in snapshot(results / "blinding").items()}
    assert after == before
    # The key is outside qa/ and holds the seed; nothing under qa/ does.
    assert (results / "blinding" / "key.tsv").is_file() and (results / "blinding" / "key.json").is_file()
    assert {r["seed"] for r in read_key(results)} == {SEED}
    assert not any(SEED.encode() in payload for payload in snapshot(results / "qa").values())


def test_adjudication_subset_with_blinded_overlays(cohort, tmp_path, capsys):
    results, records = cohort
    build(results, records)
    r1_rows = [r for r in read_key(results) if r["reader"] == "R1"]
    subset = tmp_path / "adjudicate.tsv"
    subset.write_text("participant_id\tsession_id\nsub-01\tses-baseline\n")
    mask = str(results / "work" / "series" / "sub-01" / "ses-baseline" / "mask.nii.gz")
    overlays = tmp_path / "overlays.tsv"
    overlays.write_text("participant_id\tsession_id\treader\tverdict\tvolume_ml\tmask\n"
                        f"sub-01\tses-baseline\tR1\taccept\t1.491\t{mask}\n"
                        "sub-01\tses-baseline\tR2\treject\tn/a\tn/a\n")
    adj_key = results / "blinding" / "key_adjudication.tsv"
    build(results, records, "--series", str(subset), "--overlays", str(overlays), "--key", str(adj_key),
          readers=("ADJ",))
    wl = worklist(results, "ADJ")
    assert wl["n_cases"] == 1
    (case,) = wl["cases"]
    assert sorted(o["label"] for o in case["overlays"]) == ["Reader A", "Reader B"]
    text = (results / "qa" / "ADJ" / "worklist.json").read_text()
    assert "R1" not in text and "R2" not in text
    with_mask = [o for o in case["overlays"] if o["mask"]]
    assert len(with_mask) == 1 and with_mask[0]["verdict"] == "accept"
    assert (results / "qa" / "ADJ" / with_mask[0]["mask"]).is_file()
    (adj,) = [r for r in read_key(results) if r["reader"] == "ADJ"]
    assert sorted(adj["overlays"].split(";")) == sorted(f"{o['label']}={'R1' if o['mask'] else 'R2'}"
                                                       for o in case["overlays"])
    # The adjudication key is its own file; the readers' key is untouched.
    assert {r["reader"] for r in read_key(results, [adj_key])} == {"ADJ"}
    assert [r for r in read_key(results, [results / "blinding" / "key.tsv"]) if r["reader"] == "R1"] == r1_rows
    assert {r["reader"] for r in read_key(results, [results / "blinding" / "key.tsv"])} == {"R1", "R2"}
    rc, out = run_audit(results, capsys)
    assert rc == 0 and "(ADJ, R1, R2)" in out, out


def test_rebuilding_one_reader_keeps_the_others_in_the_key(cohort):
    results, records = cohort
    build(results, records)
    before = [r for r in read_key(results) if r["reader"] == "R2"]
    build(results, records[:2], readers=("R1",))
    assert [r for r in read_key(results) if r["reader"] == "R2"] == before
    assert worklist(results, "R1")["n_cases"] == 2  # files of the dropped case are gone too
    assert len(list((results / "qa" / "R1").glob("*_t2.nii.gz"))) == 2


def test_key_is_refused_inside_qa(cohort, capsys):
    results, records = cohort
    argv = ["qa", "package", "--results-dir", str(results), "--seed", SEED, "--reader", "R1",
            "--key", str(results / "qa" / "key.tsv"), *records]
    assert main(argv) == 2
    assert "must not be inside" in capsys.readouterr().err


def run_audit(results, capsys, *extra):
    capsys.readouterr()
    rc = main(["qa", "audit", "--results-dir", str(results), *extra])
    out = capsys.readouterr()
    return rc, out.out


def test_audit_is_clean_on_a_fresh_package(cohort, capsys, tmp_path):
    results, records = cohort
    build(results, records)
    allocation = tmp_path / "allocation.tsv"
    allocation.write_text("participant_id\tarm\tsite\nsub-01\tsirolimus\tLeiden\nsub-02\tsirolimus+prednisolone\tn/a\n")
    rc, out = run_audit(results, capsys, "--allocation", str(allocation))
    assert rc == 0, out
    assert out.startswith("clean:") and "arm" in out and "site" in out


def test_audit_reads_an_allocation_saved_as_utf16_by_a_spreadsheet(cohort, capsys, tmp_path):
    # khe-vol check and the arms step take Excel's "Unicode Text"; the audit, which
    # forbids the arm names under qa/, must read the same file, not stop the run.
    results, records = cohort
    build(results, records)
    allocation = tmp_path / "allocation.tsv"
    allocation.write_bytes("participant_id\tarm\nsub-01\tsirolimus\nsub-02\tsirolimus\n".encode("utf-16"))
    rc, out = run_audit(results, capsys, "--allocation", str(allocation))
    assert rc == 0, out
    assert out.startswith("clean:") and "arm" in out
    # And the arm name is still forbidden: planted in a file name, it is found.
    (results / "qa" / "R1" / "sirolimus.txt").write_text("")
    rc, out = run_audit(results, capsys, "--allocation", str(allocation))
    assert rc == 1 and "qa/R1/sirolimus.txt: path component contains sirolimus (arm)" in out


def _png_with_text(payload, keyword, text):
    chunk = keyword.encode() + b"\0" + text.encode()
    blob = b"tEXt" + chunk
    new = struct.pack(">I", len(chunk)) + blob + struct.pack(">I", zlib.crc32(blob))
    end_of_ihdr = 8 + 12 + struct.unpack(">I", payload[8:12])[0]
    return payload[:end_of_ihdr] + new + payload[end_of_ihdr:]


def _plant(kind, results):
    """Plant one leak; returns the line the audit must print."""
    r1 = results / "qa" / "R1"
    case = worklist(results, "R1")["cases"][0]
    if kind == "file name":
        (r1 / "sub-01_notes.txt").write_text("")
        return "qa/R1/sub-01_notes.txt: path component contains sub-01 (participant)"
    if kind == "nifti descrip":
        img = nib.load(r1 / case["image"])
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
        img.header["descrip"] = b"scan of ses-m06"
        (r1 / case["image"]).write_bytes(gzip.compress(img.to_bytes(), mtime=0))
        return f"qa/R1/{case['image']}: NIfTI descrip contains ses-m06 (session)"
    if kind == "png text":
        png = r1 / case["qc_montage"]
        png.write_bytes(_png_with_text(png.read_bytes(), "Comment", "sub-02 2024-03-05"))
        return f"qa/R1/{case['qc_montage']}: PNG tEXt chunk contains 2024-03-05 (date)"
    if kind == "page text":
        # What a reader typed is shown on the case page and in the API: audited too.
        store.record_read(results / "reads" / "R1.sqlite", "R1", case["case_code"], "accept",
                          comment="same as sub_01 baseline")
        return f"page GET /case/{case['case_code']} (reader R1): content contains baseline (session)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file name", "nifti descrip", "png text", "page text"])
def test_audit_fails_on_a_planted_leak(cohort, capsys, kind):
    results, records = cohort
    build(results, records)
    expected = _plant(kind, results)
    rc, out = run_audit(results, capsys)
    assert rc == 1
    assert expected in out.splitlines(), out


def test_audit_fails_when_the_key_is_copied_into_qa(cohort, capsys):
    results, records = cohort
    build(results, records)
    (results / "qa" / "R1" / "cases.tsv").write_bytes((results / "blinding" / "key.tsv").read_bytes())
    rc, out = run_audit(results, capsys)
    assert rc == 1 and "qa/R1/cases.tsv: a copy of the unblinding key is inside qa/" in out


def test_matching_is_whole_token_and_ignores_counts_and_codes():
    scanner = Scanner([Token("sub-01", "participant"), Token("01", "participant"), Token("06", "month"),
                       Token("12", "month"), Token("m06", "session")])

    def kinds(text, strict=False):
        return sorted({leak.token.lower() for leak in scanner.find("f", "content", text, strict=strict)})

    assert kinds("SUB-01_ses-x_T2w.nii.gz") == ["01", "sub-01"]
    assert kinds("pt 01, visit M06") == ["01", "m06"]
    assert kinds("case K01X6M06QZ and sha 9a01f06c") == []  # inside codes and hashes: never
    assert kinds("volume 12.06 mL, 3 of 12 read, 0.01") == []  # decimals and counts
    assert kinds("pt 12", strict=True) == ["12"]  # short numbers still count in names and header fields
    assert kinds("acquired 05.03.2024 / 20240305 / 2024-03-05") == ["05.03.2024", "2024-03-05", "20240305"]
    assert kinds("20241399 and 2024-13-05") == []  # not dates
