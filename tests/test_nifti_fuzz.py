"""Fuzzing NIfTI headers and bytes: a clear error or a correct volume, never a crash or a hang.

Files are built byte by byte from hypothesis-chosen header fields (dims
including 0, 1, 4D, 5D and huge-but-truncated; every dtype incl. complex and
RGB; scl_slope/scl_inter incl. 0, NaN, inf, negative; qform/sform codes 0..4
with random, singular or NaN matrices; pixdim zero/negative/NaN), as NIfTI-1
or NIfTI-2, plain or gzip, and valid files are truncated or corrupted at the
byte level. Each file goes through :func:`khe_vol.nifti.load_series` (and, for
a subset, :func:`khe_vol.series.measure_series` with a reader mask stored on a
permuted/flipped grid) in a separate worker process with a per-call timeout,
so a hang or a hard crash fails the test instead of stalling CI.

Expected outcomes come from an independent model of the header: for a file
the model calls valid, loading must succeed with the model's shape, affine
and scaled voxels, and the volume must be n_voxels x |det|; for a file the
model calls invalid it must fail with SeriesError naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30.0  # per call; a normal call takes milliseconds
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VOXEL_RANGE = (0.05, 20.0)  # khe_vol.nifti.VOXEL_SIZE_RANGE_MM, restated as the spec
MIN_SLICES = 3  # khe_vol.nifti.MIN_SLICES: fewer voxels along an axis is not a volume

# --------------------------------------------------------------------------- worker

WORKER = r'''
import pickle, struct, sys, traceback, warnings, logging
warnings.simplefilter("ignore")
logging.disable(logging.CRITICAL)
import numpy as np
from khe_vol.nifti import SeriesError, load_series
from khe_vol.series import measure_series

def execute(task):
    kind = task[0]
    try:
        if kind == "load":
            s = load_series(task[1])
            return {"ok": True, "shape": s.data.shape, "affine": s.affine, "source": s.affine_source,
                    "data": s.data if s.data.size <= 100000 else None}
        if kind == "measure":
            record, mask, affine = measure_series("sub-01", "ses-01", 0, task[1], reader_mask_path=task[2])
            return {"ok": True, "record": record}
        raise RuntimeError(kind)
    except SeriesError as exc:
        return {"ok": False, "type": "SeriesError", "message": str(exc)}
    except BaseException as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc) + "\n" + traceback.format_exc()}

inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    task = pickle.loads(inp.read(struct.unpack("<Q", head)[0]))
    payload = pickle.dumps(execute(task))
    out.write(struct.pack("<Q", len(payload)) + payload)
    out.flush()
'''


class Worker:
    """One long-lived Python process running khe_vol calls, killed and restarted on a timeout."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO)

    def _read(self, n, deadline):
        buf = b""
        fd = self.proc.stdout.fileno()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError(f"worker died with exit code {self.proc.wait()}")
            buf += chunk
        return buf

    def call(self, *task, timeout=TIMEOUT_S):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            timeout += 30  # the first call pays for importing khe_vol
        payload = pickle.dumps(task)
        self.proc.stdin.write(struct.pack("<Q", len(payload)) + payload)
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        try:
            n = struct.unpack("<Q", self._read(8, deadline))[0]
            return pickle.loads(self._read(n, deadline))
        except (TimeoutError, EOFError) as exc:
            self.stop()
            pytest.fail(f"{task}: {'hung (timeout)' if isinstance(exc, TimeoutError) else exc}")

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.stop()


# --------------------------------------------------------------------------- model + writer

NAN, INF = float("nan"), float("inf")
DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float32", "float64", "complex64", "complex128", "RGB", "RGBA"]


@dataclass
class Spec:
    version: int
    gz: bool
    dims: tuple
    dtype: str
    pattern: str  # random | constant | nan_voxel
    seed: int
    slope: float
    inter: float
    qcode: int
    scode: int
    quat: tuple  # b, c, d
    qfac: float
    pixdim: tuple
    qoffset: tuple
    srow: tuple  # 12 floats
    truncate: float | None  # keep this fraction of the (uncompressed) file


def _quat_matrix(b, c, d):
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])


def _raw_array(spec, shape):
    rng = np.random.default_rng(spec.seed)
    if spec.dtype in ("RGB", "RGBA"):
        dt = np.dtype([(ch, "u1") for ch in spec.dtype])
        arr = np.zeros(shape, dt)
        for ch in spec.dtype:
            arr[ch] = rng.integers(0, 256, shape)
        return arr
    dt = np.dtype(spec.dtype)
    if spec.pattern == "constant":
        return np.full(shape, 3, dt)
    if dt.kind in "iu":
        lo = 0 if dt.kind == "u" else -100
        return rng.integers(lo, 101, shape).astype(dt)
    arr = (rng.normal(0, 50, shape) * (rng.random(shape) < 0.6)).astype(dt)
    if dt.kind == "c":
        arr = arr + 1j * rng.normal(0, 5, shape).astype(dt)
    if spec.pattern == "nan_voxel" and arr.size:
        arr.flat[rng.integers(arr.size)] = NAN
    return arr


def _f32(v):
    return float(np.float32(v))


def build(spec, path):
    """Write ``spec`` as a NIfTI file; return the model of what loading it must give."""
    hdr = (nib.Nifti1Header if spec.version == 1 else nib.Nifti2Header)()
    if spec.dtype in ("RGB", "RGBA"):
        hdr.set_data_dtype(spec.dtype)
    else:
        hdr.set_data_dtype(np.dtype(spec.dtype))
    dim = np.ones(8, dtype=int)
    dim[0] = len(spec.dims)
    dim[1:1 + len(spec.dims)] = spec.dims
    hdr["dim"] = dim
    hdr["pixdim"] = [spec.qfac, *spec.pixdim, 1, 1, 1, 1]
    hdr["scl_slope"], hdr["scl_inter"] = spec.slope, spec.inter
    hdr["qform_code"], hdr["sform_code"] = spec.qcode, spec.scode
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = spec.quat
    hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = spec.qoffset
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = np.reshape(spec.srow, (3, 4))
    hdr["xyzt_units"] = 2
    offset = hdr.single_vox_offset
    hdr["vox_offset"] = offset

    n_declared = int(np.prod([max(d, 0) for d in spec.dims], dtype=object))
    small = all(d >= 1 for d in spec.dims) and n_declared <= 4096
    arr = _raw_array(spec, tuple(spec.dims) if small else (3,))
    payload = hdr.binaryblock + b"\0" * (offset - len(hdr.binaryblock)) + arr.tobytes(order="F")
    full = small
    if spec.truncate is not None:
        keep = int(len(payload) * spec.truncate)
        full = full and keep >= len(payload)
        payload = payload[:keep]
    Path(path).write_bytes(gzip.compress(payload, mtime=0) if spec.gz else payload)
    return model(spec, arr if small else None, full)


def model(spec, arr, full):
    """What a correct reader must do with ``spec``: ``("fail", why)``, ``("ok", expected)``
    or ``("either", why)`` where the spec is outside what the model predicts exactly."""
    dims = list(spec.dims)
    while len(dims) > 3 and dims[-1] == 1 and len(dims) == 4:
        dims.pop()
    if len(dims) != 3 or min(dims) < 1:
        return "fail", "not one 3D volume"
    if min(dims) < MIN_SLICES:
        return "fail", "too few slices for a volume"
    if spec.dtype in ("complex64", "complex128", "RGB", "RGBA"):
        return "fail", "not real-valued"
    if not full:
        return "fail", "truncated"
    # Which affine, and is it usable?
    if spec.scode > 0:
        affine = np.eye(4)
        affine[:3] = np.reshape([_f32(v) for v in spec.srow], (3, 4))
    elif spec.qcode > 0:
        b, c, d = (_f32(v) for v in spec.quat)
        pix = np.array([_f32(v) for v in spec.pixdim])
        if not np.all(np.isfinite([b, c, d, *pix, *spec.qoffset])):
            return "fail", "NaN in qform"
        if np.any(pix == 0):
            return "fail", "zero voxel size in qform"
        if b * b + c * c + d * d > 1 - 1e-6 or np.any(pix < 0) or _f32(spec.qfac) not in (1.0, -1.0):
            return "either", "qform nibabel repairs (NIfTI sets a tiny quaternion a to 0)"
        affine = np.eye(4)
        affine[:3, :3] = _quat_matrix(b, c, d) @ np.diag(pix * [1, 1, _f32(spec.qfac)])
        affine[:3, 3] = [_f32(v) for v in spec.qoffset]
    else:
        return "fail", "no orientation code"
    if not np.all(np.isfinite(affine)):
        return "fail", "NaN affine"
    det = abs(np.linalg.det(affine[:3, :3]))
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lo, hi = VOXEL_RANGE
    if det < 1e-9 or np.any(sizes < lo * (1 - 1e-6)) or np.any(sizes > hi * (1 + 1e-6)):
        return "fail", "singular or implausible voxel size"
    if det < 1e-8 or np.any(sizes < lo * (1 + 1e-6)) or np.any(sizes > hi * (1 - 1e-6)):
        return "either", "geometry at a limit"
    # Voxel values as scl_slope/scl_inter define them (slope 0 or non-finite: unscaled).
    slope, inter = _f32(spec.slope), _f32(spec.inter)
    values = arr.astype(np.float64).reshape(dims)
    if slope != 0 and np.isfinite(slope):
        if not np.isfinite(inter):
            return "fail", "valid slope, invalid intercept"
        values = values * slope + inter
    values32 = values.astype(np.float32)
    if not np.all(np.isfinite(values32)):
        return "fail", "NaN or infinite voxels"
    if values32.max() == values32.min():
        return "fail", "blank"
    return "ok", {"shape": tuple(dims), "affine": affine, "data": values32, "det": det}


# --------------------------------------------------------------------------- strategies

def _unit_quaternion(draw):
    q = draw(st.tuples(*[st.floats(-1, 1)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1))
    return np.asarray(q) / np.linalg.norm(q)


def _rotation(w, x, y, z):
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


#: What can be wrong with a file; a spec is a valid file with 0 to 3 of these.
DEFECTS = ["dims", "huge", "dtype", "pattern", "slope", "inter", "codes", "quat", "qfac",
           "pixdim", "qoffset", "srow", "truncate"]


@st.composite
def specs(draw):
    """A valid file (3D, real dtype, scanner geometry in sform and/or qform), then defects."""
    defects = set(draw(st.lists(st.sampled_from(DEFECTS), max_size=3)))
    dims = draw(st.tuples(*[st.integers(2, 9)] * 3))
    if draw(st.integers(0, 4)) == 0:
        dims = (*dims, 1)  # a singleton 4th axis is fine
    if "dims" in defects:  # 0, negative, 1D, 2D, 4D, 5D
        dims = draw(st.lists(st.integers(-2, 5), min_size=1, max_size=5).map(tuple))
    if "huge" in defects:  # declared far beyond the bytes present
        dims = draw(st.tuples(*[st.integers(2, 32767)] * draw(st.integers(3, 4))))
    dtype = draw(st.sampled_from(DTYPES if "dtype" in defects else DTYPES[:10]))
    pattern = draw(st.sampled_from(["constant", "nan_voxel"])) if "pattern" in defects else "random"
    slope, inter = 1.0, 0.0
    if draw(st.booleans()):
        slope, inter = draw(st.sampled_from([-2.5, 0.5, 1e-3, 1e30])), draw(st.sampled_from([1.5, -100.0]))
    if "slope" in defects:
        slope = draw(st.sampled_from([0.0, NAN, INF, -INF]))
    if "inter" in defects:
        inter = draw(st.sampled_from([NAN, INF, -INF]))
    qcode, scode = draw(st.sampled_from([(1, 1), (0, 1), (1, 0), (0, 2), (4, 0), (2, 3), (3, 4)]))
    if "codes" in defects:
        qcode, scode = draw(st.integers(0, 4)), 0
    # qform: a unit quaternion (a >= 0), positive pixdim, qfac +/-1.
    q = _unit_quaternion(draw)
    q = q if q[0] >= 0 else -q
    quat = tuple(q[1:])
    if "quat" in defects:
        quat = draw(st.tuples(st.sampled_from([NAN, INF, 1.5, -1.0, 1.0]), st.floats(-1, 1), st.floats(-1, 1)))
    qfac = draw(st.sampled_from([1.0, -1.0]))
    if "qfac" in defects:
        qfac = draw(st.sampled_from([0.0, 0.5, NAN, -3.0]))
    pixdim = draw(st.tuples(*[st.floats(0.3, 5.0)] * 3))
    if "pixdim" in defects:
        bad = draw(st.sampled_from([0.0, -1.0, -0.7, NAN, INF, 0.01, 30.0]))
        pixdim = tuple(bad if i == draw(st.integers(0, 2)) else v for i, v in enumerate(pixdim))
    qoffset = draw(st.tuples(*[st.floats(-200, 200)] * 3))
    if "qoffset" in defects:
        qoffset = (NAN, qoffset[1], qoffset[2])
    # sform: rotation x zooms x flips (scanner-like), or a defect.
    m = np.zeros((3, 4))
    zooms = np.array(draw(st.tuples(*[st.floats(0.3, 5.0)] * 3))) * draw(
        st.tuples(*[st.sampled_from([-1, 1])] * 3))
    m[:, :3] = _rotation(*_unit_quaternion(draw)) @ np.diag(zooms)
    m[:, 3] = draw(st.tuples(*[st.floats(-200, 200)] * 3))
    if "srow" in defects:
        kind = draw(st.sampled_from(["singular", "random", "nan", "tiny", "huge"]))
        if kind == "singular":
            m[:, 2] = m[:, 0] * draw(st.sampled_from([0.0, 1.0, -2.0]))
        elif kind == "random":
            m[:, :3] = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(0, 3, (3, 3))
        elif kind == "nan":
            m[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = draw(st.sampled_from([NAN, INF]))
        else:
            m[:, :3] *= 1e-3 if kind == "tiny" else 50.0
    truncate = draw(st.floats(0.0, 0.999)) if "truncate" in defects else None
    return Spec(draw(st.sampled_from([1, 2])), draw(st.booleans()), dims, dtype, pattern,
                draw(st.integers(0, 2**32 - 1)), slope, inter, qcode, scode, quat, qfac, pixdim,
                qoffset, tuple(m.ravel()), truncate)


# --------------------------------------------------------------------------- checks

def _assert_clear_error(result, *paths):
    assert not result["ok"]
    assert result["type"] == "SeriesError", f"crash instead of a clear error: {result['type']}: {result['message']}"
    assert any(str(p) in result["message"] for p in paths), result["message"]


def _assert_sane_success(result):
    """Whatever a successful load returns must be usable: what the workflow relies on."""
    shape, affine, data = result["shape"], result["affine"], result["data"]
    assert len(shape) == 3 and min(shape) >= 1
    assert np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) >= 1e-9
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    assert np.all(sizes >= VOXEL_RANGE[0]) and np.all(sizes <= VOXEL_RANGE[1])
    if data is not None:
        assert data.shape == shape and np.all(np.isfinite(data)) and data.max() > data.min()


def _axis_map(shape, perm, flip):
    """New index -> old index (4x4) for ``np.flip(np.transpose(a, perm), flipped)``."""
    new_shape = [shape[p] for p in perm]
    P = np.zeros((4, 4))
    P[3, 3] = 1
    for new_axis, old_axis in enumerate(perm):
        P[old_axis, new_axis] = -1 if flip[new_axis] else 1
        if flip[new_axis]:
            P[old_axis, 3] = new_shape[new_axis] - 1
    return P


def _save_mask(path, mask, affine, image_class=nib.Nifti1Image):
    img = image_class(mask.astype(np.uint8), None)
    img.set_sform(affine, code=1)
    img.set_qform(None, code=0)
    nib.save(img, path)


@FUZZ
@given(spec=specs(), measure=st.booleans(), perm=st.permutations(range(3)),
       flip=st.tuples(*[st.booleans()] * 3))
def test_header_fuzz_clear_error_or_correct_volume(worker, spec, measure, perm, flip):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("sub-01_ses-01_T2w.nii" + (".gz" if spec.gz else ""))
        verdict, expected = build(spec, path)
        result = worker.call("load", str(path))
        if verdict == "fail":
            _assert_clear_error(result, path)
            return
        if not result["ok"]:
            assert verdict == "either", f"refused a valid file: {result['message']}"
            _assert_clear_error(result, path)
            return
        _assert_sane_success(result)
        if verdict == "either":
            return
        assert result["shape"] == expected["shape"]
        assert result["source"] == ("sform" if spec.scode > 0 else "qform")
        assert np.allclose(result["affine"], expected["affine"], rtol=1e-5, atol=1e-4)
        want = expected["data"]
        assert np.allclose(result["data"], want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        if not measure:
            return
        # A reader mask = image > 0, stored on a permuted/flipped copy of the grid.
        mask = result["data"] > 0
        stored = np.transpose(mask, perm)
        stored = np.flip(stored, [a for a in range(3) if flip[a]]) if any(flip) else stored
        mask_path = Path(tmp) / "sub-01_ses-01_label-lesion_mask.nii.gz"
        _save_mask(mask_path, stored, expected["affine"] @ _axis_map(mask.shape, perm, flip))
        out = worker.call("measure", str(path), str(mask_path))
        assert out["ok"], out["message"]
        record = out["record"]
        n = int(mask.sum())
        if n == 0:  # an empty reader mask at the baseline (month 0) is a wrong file
            assert record["status"] == "error" and "empty" in record["message"], record["message"]
            return
        assert record["status"] == "ok", record["message"]
        assert record["n_voxels"] == n
        assert record["volume_ml"] == pytest.approx(n * expected["det"] / 1000, rel=1e-5, abs=1e-12)
        assert record["volume_low_ml"] <= record["volume_ml"] <= record["volume_high_ml"]


# --------------------------------------------------------------------------- byte-level corruption

@st.composite
def valid_files(draw):
    shape = draw(st.tuples(*[st.integers(3, 8)] * 3))
    dtype = draw(st.sampled_from(["int16", "float32", "uint8"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.integers(0, 200, shape).astype(dtype)
    data.flat[0], data.flat[1] = 0, 1  # never blank
    q = rng.normal(size=4)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(*(q / np.linalg.norm(q))) @ np.diag(rng.uniform(0.4, 4, 3))
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return draw(st.sampled_from([1, 2])), draw(st.booleans()), data, affine


@FUZZ
@given(base=valid_files(), op=st.sampled_from(["truncate", "flip", "overwrite"]),
       where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=4),
       noise=st.binary(min_size=1, max_size=64), bit=st.integers(0, 7))
def test_truncated_or_corrupted_bytes(worker, base, op, where, noise, bit):
    version, gz, data, affine = base
    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.nii"
        img = (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(data, None)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        nib.save(img, good)
        plain = good.read_bytes()
        offset = img.header.single_vox_offset
        stored = gzip.compress(plain, mtime=0) if gz else plain
        original = worker.call("load", str(good))
        assert original["ok"], original["message"]

        raw = bytearray(stored)
        positions = sorted({int(f * len(raw)) for f in where})
        if op == "truncate":
            raw = raw[:positions[0]]
        elif op == "flip":
            for p in positions:
                raw[p] ^= 1 << bit
        else:
            p = positions[0]
            raw[p:p + len(noise)] = noise[: max(0, len(raw) - p)]
        if bytes(raw) == stored:
            return
        path = Path(tmp) / ("bad.nii" + (".gz" if gz else ""))
        path.write_bytes(bytes(raw))
        result = worker.call("load", str(path))
        if op == "truncate":  # every byte of a NIfTI file is header or voxels
            _assert_clear_error(result, path)
            return
        if not result["ok"]:
            _assert_clear_error(result, path)
            return
        _assert_sane_success(result)
        if gz:
            # gzip carries a CRC: a corrupted stream read back is the original, or an error.
            assert result["shape"] == original["shape"]
            assert np.array_equal(result["affine"], original["affine"])
            assert np.array_equal(result["data"], original["data"])
        elif positions[0] >= offset:
            # Only voxel bytes changed: same grid, and exactly the voxels now stored.
            assert result["shape"] == original["shape"]
            assert np.array_equal(result["affine"], original["affine"])
            now = np.frombuffer(bytes(raw[offset:offset + data.nbytes]), dtype=data.dtype)
            assert np.array_equal(result["data"], now.reshape(data.shape, order="F").astype(np.float32))
        # A corrupted header that still loads must give a volume consistent with its grid.
        if result["data"] is not None:
            mask = result["data"] > np.median(result["data"])
            mask_path = Path(tmp) / "mask.nii.gz"
            # NIfTI-2: a float64 sform, so any grid a corrupted header gives is kept exactly.
            _save_mask(mask_path, mask, result["affine"], nib.Nifti2Image)
            out = worker.call("measure", str(path), str(mask_path))
            assert out["ok"], out["message"]
            record = out["record"]
            if not mask.any():  # an empty reader mask at the baseline (month 0) is a wrong file
                assert record["status"] == "error" and "empty" in record["message"], record["message"]
                return
            assert record["status"] == "ok", record["message"]
            assert record["n_voxels"] == int(mask.sum())
            assert record["volume_ml"] == pytest.approx(
                mask.sum() * abs(np.linalg.det(result["affine"][:3, :3])) / 1000, rel=1e-5, abs=1e-12)


def test_worker_reports_hangs_and_crashes_as_failures(worker):
    """The harness itself: a missing file is a clear error, an unknown task a reported crash."""
    missing = Path(tempfile.gettempdir()) / "khe_vol_fuzz_missing.nii.gz"
    _assert_clear_error(worker.call("load", str(missing)), missing)
    crash = worker.call("nonsense")
    assert not crash["ok"] and crash["type"] == "RuntimeError"
