"""The reader app against hostile input: each probe that once hurt the server, as an HTTP request.

Uploads (gzip bombs, a header announcing a gigabyte of offset, RGB, float,
complex, NaN, negative and truncated masks), out-of-range revision numbers,
Host headers that are not this server's, and comments that would make the
leak audit fail: each gets a 4xx with a message, and nothing is saved.
"""

from __future__ import annotations

import gzip
import io
import socket
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.qa import store
from khe_vol.qa.app import create_app, host_allowed
from khe_vol.qa.upload import UploadRefused, mask_from_upload, max_upload_bytes
from tests.test_qa_app import free_port, kill_hard, package, start_server  # noqa: F401  (fixture)

HEADERS = {"X-Khe-Vol": "reader"}


@pytest.fixture
def app_case(package, tmp_path):  # noqa: F811  (the fixture imported above)
    results, codes = package
    code = codes[("sub-01", "ses-m06")]
    db = tmp_path / "reads.sqlite"
    app = create_app(results, "R1", db_path=db, check_viewer=False)
    case = nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    return app.test_client(), code, case, db


def post_mask(client, code, payload, comment=""):
    data = {"verdict": "edited", "comment": comment, "mask": (io.BytesIO(payload), "drawing.nii.gz")}
    return client.post(f"/api/case/{code}/read", data=data, headers=HEADERS)


def nifti(data, affine):
    return nib.Nifti1Image(data, affine).to_bytes()


def gzip_stream(*parts, trailing_zero_bytes=0):
    """A gzip member of ``parts`` followed by that many zero bytes, compressed without holding them."""
    out = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = [out.compress(p) for p in parts]
    chunk = bytes(2**20)
    for _ in range(trailing_zero_bytes // len(chunk)):
        body.append(out.compress(chunk))
    body.append(out.flush())
    return b"".join(body)


def refused(response, *words):
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    message = response.json["error"]
    for word in words:
        assert word in message, message
    return message


def test_a_gzip_bomb_is_refused_without_decompressing_it(app_case):
    client, code, case, db = app_case
    drawing = np.zeros(case.shape, np.uint8)
    bomb = gzip_stream(nifti(drawing, case.affine), trailing_zero_bytes=48 * 2**20)
    # 48 MiB of zeros behind a valid mask, short enough to pass the length check: the inflating is what stops.
    assert len(bomb) < max_upload_bytes(case.shape)
    tracemalloc.start()
    try:
        response = post_mask(client, code, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    refused(response, "more data than its header declares")
    # Decompression stopped at the case's own size (tens of kB), not at 48 MiB.
    assert peak < 32 * 2**20, peak
    assert store.current_reads(db) == []


def test_a_header_announcing_a_huge_offset_is_refused_before_reading_data(app_case):
    client, code, case, db = app_case
    img = nib.Nifti1Image(np.zeros(case.shape, np.uint8), case.affine)
    header = img.header.copy()
    header["vox_offset"] = 1e9
    payload = gzip.compress(header.binaryblock + bytes(4) + bytes(int(np.prod(case.shape))))
    refused(post_mask(client, code, payload), "data offset", "1e+09")
    assert store.current_reads(db) == []


@pytest.mark.parametrize(
    "dtype, fill, words",
    [
        (np.float32, 1.0, ("float32", "not integer labels")),
        (np.float64, np.nan, ("float64", "not integer labels")),
        (np.complex64, 1 + 1j, ("complex64", "not integer labels")),
        (np.int16, -1, ("negative",)),
    ],
)
def test_masks_that_are_not_labels_are_refused_not_binarised(app_case, dtype, fill, words):
    client, code, case, db = app_case
    drawing = np.zeros(case.shape, dtype)
    drawing[3:6, 4:7, 5] = fill
    refused(post_mask(client, code, gzip.compress(nifti(drawing, case.affine))), *words)
    assert store.current_reads(db) == []


def test_rgb_truncated_and_foreign_uploads_get_a_message(app_case):
    client, code, case, db = app_case
    rgb = np.zeros(case.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    refused(post_mask(client, code, nifti(rgb, case.affine)), "not integer labels")
    good = gzip.compress(nifti(np.ones(case.shape, np.uint8), case.affine))
    refused(post_mask(client, code, good[: len(good) // 2]), "truncated")
    refused(post_mask(client, code, good[:100]), "truncated")
    # Every voxel there but the CRC trailer cut off (or wrong): nothing vouches for the bytes.
    refused(post_mask(client, code, good[:-8]), "truncated")
    refused(post_mask(client, code, good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]), "not valid gzip")
    refused(post_mask(client, code, nifti(np.ones(case.shape, np.uint8), case.affine)[:-10]), "cut short")
    two = nib.Nifti2Image(np.ones(case.shape, np.uint8), case.affine).to_bytes()
    refused(post_mask(client, code, two), "NIfTI-2")
    refused(post_mask(client, code, b"\x1f\x8bnot gzip at all"), "not valid gzip")
    assert store.current_reads(db) == []
    # A plain uint8 drawing with NiiVue's pen colours is a mask: saved, binarised.
    drawing = np.zeros(case.shape, np.uint8)
    drawing[3:6, 4:7, 5] = 3
    assert post_mask(client, code, gzip.compress(nifti(drawing, case.affine))).status_code == 200
    (read,) = store.current_reads(db)
    saved = nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"]))
    assert np.array_equal(np.asarray(saved.dataobj), (drawing != 0).astype(np.uint8))


def test_mask_from_upload_keeps_the_case_orientation():
    affine = np.array([[0.0, 0, -2, 10], [-1, 0, 0, 5], [0, 1.5, 0, -3], [0, 0, 0, 1]])
    data = np.zeros((5, 6, 7), np.uint8)
    data[1, 2, 3] = 1
    data[4, 5, 6] = 1
    for payload in (nifti(data, affine), gzip.compress(nifti(data, affine)),
                    gzip.compress(nifti(data[:, :, :, None], affine))):  # 4D with one volume
        assert np.array_equal(mask_from_upload(payload, data.shape, affine), data != 0)
    with pytest.raises(UploadRefused, match="not on the case grid"):
        mask_from_upload(nifti(data, affine), (5, 7, 6), affine)


def test_an_upload_longer_than_any_mask_of_the_case_is_refused_unread(app_case):
    client, code, case, db = app_case
    limit = max_upload_bytes(case.shape)
    assert limit < 4 * np.prod(case.shape) + 2**17  # the case's own size, not the service's 256 MiB
    # Starts like a valid gzip drawing, then goes on: refused by its length, before any parsing.
    drawing = gzip.compress(nifti(np.zeros(case.shape, np.uint8), case.affine))
    refused(post_mask(client, code, drawing + bytes(limit + 1 - len(drawing))), "larger than any mask of this case",
            str(limit))
    with pytest.raises(UploadRefused, match="larger than any mask"):
        mask_from_upload(bytes(limit + 1), case.shape, case.affine)
    assert store.current_reads(db) == []


def test_revision_numbers_past_sqlite_range_are_not_found(app_case):
    client, code, _, _ = app_case
    for revision in (1, 2**31 + 1, 2**63, 2**64 + 5, 10**30):
        response = client.get(f"/api/case/{code}/revision/{revision}/edited_mask.nii.gz")
        assert response.status_code == 404
        assert response.json["error"] == f"case {code} has no edited mask at revision {revision}"


def test_host_must_name_this_server_exactly():
    names = ("127.0.0.1", "localhost", "[::1]")
    for host in ("127.0.0.1", "127.0.0.1:8765", "localhost:80", "LOCALHOST", "[::1]", "[::1]:8765"):
        assert host_allowed(host, names), host
    for host in (None, "", "[::2]", "[2001:db8::1]", "[2001:db8::1]:8765", "[::1]x", "127.0.0.1:", "127.0.0.1:x",
                 "127.0.0.1.evil.example", "evil.example", "localhost:8765@evil", "[::1]:99999999"):
        assert not host_allowed(host, names), host


def test_the_served_app_refuses_foreign_and_missing_hosts(package, tmp_path):  # noqa: F811
    results, _ = package
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = start_server(results, port, log)
    try:
        def status(request):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request)
                return s.recv(64).split(b" ")[1]

        # The login page (the service answers everything else only after a login).
        assert status(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n") == b"200"
        assert status(b"GET /login HTTP/1.1\r\nHost: [::2]\r\nConnection: close\r\n\r\n") == b"403"
        assert status(b"GET /login HTTP/1.1\r\nHost: [2001:db8::1]:80\r\nConnection: close\r\n\r\n") == b"403"
        assert status(b"GET /login HTTP/1.0\r\n\r\n") in (b"400", b"403")
    finally:
        kill_hard(proc)


def test_a_comment_the_audit_would_flag_is_refused_and_the_audit_stays_clean(package, tmp_path):  # noqa: F811
    results, codes = package
    code = codes[("sub-01", "ses-m06")]
    db_dir = tmp_path / "reads"
    client = create_app(results, "R1", db_path=db_dir / "R1.sqlite", check_viewer=False).test_client()

    def post(comment):
        return client.post(f"/api/case/{code}/read", data={"verdict": "accept", "comment": comment},
                           headers=HEADERS)

    message = refused(post("residual smaller than at baseline; compare m06"), "'m06'", "Rephrase")
    assert "nothing was saved" in message
    refused(post("looks like sub-01 again"), "'sub-01'")
    refused(post("scanned 2024-03-05"), "'2024-03-05'")
    refused(post("scanned 2024-03-05T10:30, see the prior"), "'2024-03-05'")  # an ISO date-time is a date too
    refused(post("series 20240305T103000"), "'20240305'")
    refused(post("x" * 5001), "5001 characters")
    assert store.current_reads(db_dir / "R1.sqlite") == []
    assert post("residual smaller than before; rim enhancement at the medial edge").status_code == 200
    assert main(["qa", "audit", "--results-dir", str(results), "--db-dir", str(db_dir)]) == 0
