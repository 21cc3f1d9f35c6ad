"""Load and fault benchmark of the reading service: many readers saving signed reads at once.

Builds (once, then reused) a small synthetic reading cohort: C baseline
series with a proposed mask, packaged for N readers (``khe-vol qa package``),
each reader an account with a password (:mod:`khe_vol.qa.accounts`). Then,
twice, on a fresh copy of it:

1. *steady*: starts the production server (``khe-vol qa serve --results-dir R``,
   waitress) as a subprocess on loopback; N client threads each log in
   through ``POST /login``, take the CSRF token from ``GET /api/session``
   and the case codes from ``GET /api/worklist``, and save M reads over
   HTTP, one after the other, cycling through their cases (each read after
   the first of a case is a revision, with ``expected_revision`` and a
   reason). Every read is signed (the password re-entered); every third is
   an edited mask uploaded as gzip NIfTI on the case grid.
2. *kill*: the same, with the server SIGKILLed when half of all reads are
   acknowledged, and started again at once on the same port. A client whose
   request fails retries the same read (same ``expected_revision``: a read
   stored before the kill is answered 409, never stored twice).

Each run prints and records: reads acknowledged (HTTP 200), reads found in
the databases afterwards, lost (acknowledged, not found, or found with
other content), duplicated (one client read stored twice), stored but not
acknowledged (in flight at the kill), errors, p50/p95/max save latency of
the acknowledged first attempts, server peak RSS (psutil, else
``/proc/<pid>/status`` VmHWM), and ``khe-vol qa verify``'s exit code.

Usage, from the repository root (about 2-4 minutes on 2 cores)::

    python benchmarks/reading_service.py        # writes results/benchmark_reading_service.json
    python benchmarks/reading_service.py --readers 4 --reads 10   # a quick look
    python benchmarks/reading_service.py --think-seconds 3   # readers pausing ~3 s before each read

Loopback only; the server and the clients share the machine's cores, so
latencies include the clients' own CPU time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from khe_vol.files import atomic_write_bytes, sha256_file
from khe_vol.nifti import mask_image, nifti_bytes, write_nifti
from khe_vol.qa import accounts, default_db_path, reader_dir
from khe_vol.qa.deidentify import mask_like
from khe_vol.qa.store import all_reads

REPO = Path(__file__).resolve().parents[1]
SHAPE = (64, 64, 16)
VOXEL_MM = (1.0, 1.0, 3.0)
PACKAGE_SEED = 738495061274
#: Seconds a client keeps retrying one read while the server is down.
RETRY_SECONDS = 60.0


def _password(reader):
    return f"benchmark-password-{reader}"


def _ball(shape, affine, centre_mm, radius_mm):
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(xyz - np.asarray(centre_mm), axis=1) <= radius_mm).reshape(shape)


def build_template(root, n_readers, n_cases):
    """Workflow records, reader packages and accounts under ``root`` (reused when the same spec is there).

    Returns
    -------
    (Path, list of str)
        The results folder and the reader ids.
    """
    readers = [f"R{i:02d}" for i in range(1, n_readers + 1)]
    spec = {"readers": n_readers, "cases": n_cases, "shape": SHAPE, "voxel_mm": VOXEL_MM, "seed": PACKAGE_SEED,
            "version": 1}
    stamp = root / "template.json"
    results = root / "results"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
        return results, readers
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(15)
    affine = np.diag([*VOXEL_MM, 1.0])
    affine[:3, 3] = [-32.0, -32.0, -24.0]
    records = []
    for i in range(n_cases):
        pid = f"sub-{i + 1:03d}"
        lesion = _ball(SHAPE, affine, rng.uniform(-8, 8, 3), rng.uniform(6, 12))
        data = (200 + 400 * lesion + rng.normal(0, 10, SHAPE)).astype(np.int16)
        src = root / "imaging" / pid / "ses-baseline" / "anat" / f"{pid}_ses-baseline_T2w.nii.gz"
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(gzip.compress(img.to_bytes(), mtime=0))
        rec_dir = results / "work" / "series" / pid / "ses-baseline"
        write_nifti(rec_dir / "mask.nii.gz", mask_image(lesion, affine))
        record = {"participant_id": pid, "session_id": "ses-baseline", "month": 0, "status": "ok", "message": None,
                  "method": "auto", "volume_ml": float(lesion.sum()) * float(np.prod(VOXEL_MM)) / 1000.0,
                  "source_file": str(src), "source_sha256": sha256_file(src), "shape": list(SHAPE),
                  "affine": affine.tolist()}
        atomic_write_bytes(rec_dir / "record.json", (json.dumps(record, indent=2) + "\n").encode())
        records.append(rec_dir / "record.json")
    cmd = [sys.executable, "-m", "khe_vol.cli", "qa", "package", "--results-dir", str(results), "--seed",
           str(PACKAGE_SEED)]
    for r in readers:
        cmd += ["--reader", r]
    subprocess.run(cmd + [str(p) for p in records], check=True, stdout=subprocess.DEVNULL)
    db = accounts.default_accounts_path(results)
    for r in readers:
        accounts.enrol(db, accounts.add_account(db, r), _password(r))
    stamp.write_text(json.dumps(spec))
    return results, readers


def edited_masks(results, reader, worklist):
    """An edited mask (gzip NIfTI on the case grid: a ball at the grid's centre) per case code of a reader."""
    folder = reader_dir(results, reader)
    out = {}
    for row in worklist["rows"]:
        case = row["case"]
        img = nib.load(folder / case["image"])
        shape = img.shape[:3]
        centre = img.affine[:3, :3] @ (np.asarray(shape) / 2.0) + img.affine[:3, 3]
        out[case["case_code"]] = nifti_bytes(mask_like(_ball(shape, img.affine, centre, 7.0), img))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``khe-vol qa serve`` as a subprocess in its own process group, with its peak RSS watched."""

    def __init__(self, results, port, log_path):
        self.results, self.port, self.log_path = results, port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.proc = None
        self.peak_rss_bytes = 0
        self.cpu_s = {}  # pid -> user + system CPU seconds at the last look (a killed server keeps its last)
        self.starts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_rss, daemon=True)

    def start(self):
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "khe_vol.cli", "qa", "serve", "--results-dir",
                                     str(self.results), "--port", str(self.port)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {self.log_path}")
            try:
                if requests.get(f"{self.base}/login", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the server did not answer within 60 s; see {self.log_path}")
        with self._lock:
            self.proc = proc
            self.starts += 1
        if not self._watch.is_alive():
            self._watch.start()

    def _rss(self, pid):
        try:
            import psutil

            proc = psutil.Process(pid)
            times = proc.cpu_times()
            self.cpu_s[pid] = times.user + times.system
            return proc.memory_info().rss
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - the process just died: no reading
            return 0
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):  # the kernel's own peak RSS of the process
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _watch_rss(self):
        while not self._stop.is_set():
            with self._lock:
                pid = None if self.proc is None or self.proc.poll() is not None else self.proc.pid
            if pid is not None:
                self.peak_rss_bytes = max(self.peak_rss_bytes, self._rss(pid))
            time.sleep(0.05)

    def kill(self):
        """SIGKILL, without warning (the server's own process group: just it)."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self):
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._stop.set()


class Reader(threading.Thread):
    """One simulated reader: logs in, then saves ``n_reads`` signed reads one after the other."""

    def __init__(self, base, results, reader, n_reads, progress, think_seconds=0.0, rng_seed=0):
        super().__init__(daemon=True)
        self.base, self.results, self.reader, self.n_reads, self.progress = base, results, reader, n_reads, progress
        self.think_seconds = think_seconds
        self.rng = np.random.default_rng(rng_seed)
        self.acked = []  # (token, case_code, revision, verdict)
        self.late = []  # tokens answered 409 after a failed attempt: stored before the answer was lost
        self.latencies_s = []  # acknowledged first attempts
        self.retried_s = []  # acknowledged after at least one failed attempt: time from the first try
        self.errors = []
        self.http = requests.Session()
        self.csrf = None

    def login(self):
        resp = self.http.post(f"{self.base}/login", data={"account": self.reader, "password": _password(self.reader)},
                              allow_redirects=False, timeout=30)
        if resp.status_code not in (302, 303):
            raise RuntimeError(f"{self.reader}: login answered {resp.status_code}: {resp.text[:200]}")
        session = self.http.get(f"{self.base}/api/session", timeout=30).json()
        if session.get("account") != self.reader:
            raise RuntimeError(f"{self.reader}: /api/session says {session}")
        self.csrf = session["csrf_token"]

    def run(self):
        try:
            self.login()
            worklist = self.http.get(f"{self.base}/api/worklist", timeout=30).json()
            masks = edited_masks(self.results, self.reader, worklist)
            codes = [row["case"]["case_code"] for row in worklist["rows"]]
            revision = {row["case"]["case_code"]: (row["current"] or {}).get("revision", 0) for row in worklist["rows"]}
            for i in range(self.n_reads):
                if self.think_seconds:  # looking at the case: 0.5-1.5 x the mean, so readers do not march in step
                    time.sleep(self.think_seconds * self.rng.uniform(0.5, 1.5))
                code = codes[i % len(codes)]
                verdict = "edited" if i % 3 == 2 else ("accept", "reject")[i % 2]
                token = f"bench-{self.reader}-{i:04d}"
                fields = {"verdict": verdict, "comment": token, "expected_revision": str(revision[code]),
                          "password": _password(self.reader), "seconds_to_verdict": "30.0"}
                if revision[code]:
                    fields["reason"] = f"second look ({token})"
                files = {"mask": ("mask.nii.gz", masks[code], "application/octet-stream")} if verdict == "edited" else None
                revision[code] = self.save(code, token, verdict, fields, files, revision[code])
        except Exception as exc:  # noqa: BLE001 - reported in the figures
            self.errors.append(f"{self.reader}: {type(exc).__name__}: {exc}")

    def save(self, code, token, verdict, fields, files, expected):
        """POST one read until it is answered; return the case's revision afterwards."""
        first = time.perf_counter()
        failed = False
        while True:
            t0 = time.perf_counter()
            try:
                resp = self.http.post(f"{self.base}/api/case/{code}/read", data=fields, files=files, timeout=60,
                                      headers={"X-CSRF-Token": self.csrf or "", "X-Khe-Vol": "reader"},
                                      allow_redirects=False)
            except requests.RequestException:
                failed = True
                if time.perf_counter() - first > RETRY_SECONDS:
                    raise
                time.sleep(0.2)
                continue
            elapsed = time.perf_counter() - t0
            if resp.status_code in (302, 303, 401) or (resp.status_code == 403 and failed):
                self.login()  # a session the restarted server does not know: log in again, same read
                failed = True
                continue
            if resp.status_code == 200:
                view = resp.json()
                self.acked.append((token, code, view.get("revision"), verdict))
                (self.retried_s if failed else self.latencies_s).append(
                    time.perf_counter() - first if failed else elapsed)
                self.progress()
                return view.get("revision", expected + 1)
            if resp.status_code == 409 and failed:
                view = resp.json().get("view") or {}
                self.late.append(token)
                self.progress()
                return view.get("revision", expected + 1)
            self.errors.append(f"{self.reader} {token}: HTTP {resp.status_code}: {resp.text[:200]}")
            return expected


def _percentile(values, q):
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q, method="linear"))


def run_once(template, work, readers, n_reads, kill_midway, think_seconds=0.0):
    """One run on a fresh copy of the template; returns its figures."""
    results = work / "results"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, results)
    server = Server(results, free_port(), work / "server.log")
    server.start()
    total = len(readers) * n_reads
    done = {"n": 0}
    done_lock = threading.Lock()
    half = threading.Event()

    def progress():
        with done_lock:
            done["n"] += 1
            if done["n"] >= total // 2:
                half.set()

    clients = [Reader(server.base, results, r, n_reads, progress, think_seconds, i) for i, r in enumerate(readers)]
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    downtime_s = None
    if kill_midway:
        half.wait(timeout=600)
        t_kill = time.perf_counter()
        server.kill()
        server.start()
        downtime_s = time.perf_counter() - t_kill
    for c in clients:
        c.join(timeout=900)
    wall_s = time.perf_counter() - t0
    server.stop()
    verify = subprocess.run([sys.executable, "-m", "khe_vol.cli", "qa", "verify", "--results-dir", str(results)],
                            capture_output=True, text=True)

    acked = {tok: (code, rev, verdict) for c in clients for tok, code, rev, verdict in c.acked}
    stored = {}
    n_found = 0
    for r in readers:
        for row in all_reads(default_db_path(results, r)):
            n_found += 1
            stored.setdefault(row["comment"], []).append((row["case_code"], row["revision"], row["verdict"]))
    lost = [tok for tok, want in acked.items() if stored.get(tok) != [want]]
    duplicated = [tok for tok, rows in stored.items() if len(rows) > 1]
    unacked = [tok for tok in stored if tok not in acked]
    latencies = [s for c in clients for s in c.latencies_s]
    figures = {
        "kill_midway": kill_midway, "think_seconds": think_seconds, "readers": len(readers),
        "reads_per_reader": n_reads, "reads_attempted": total,
        "acknowledged": len(acked), "found_in_databases": n_found, "lost": len(lost), "duplicated": len(duplicated),
        "stored_not_acknowledged": len(unacked),
        "answered_409_after_retry": sum(len(c.late) for c in clients),
        "edited_acknowledged": sum(1 for v in acked.values() if v[2] == "edited"),
        "errors": [e for c in clients for e in c.errors][:20],
        "n_errors": sum(len(c.errors) for c in clients),
        "save_latency_ms": {"n": len(latencies), "p50": _ms(_percentile(latencies, 50)),
                            "p95": _ms(_percentile(latencies, 95)), "max": _ms(max(latencies, default=None))},
        "saves_across_the_restart_ms": sorted(_ms(s) for c in clients for s in c.retried_s),
        "server_peak_rss_mib": round(server.peak_rss_bytes / 2**20, 1),
        "server_cpu_ms_per_save": round(1000.0 * sum(server.cpu_s.values()) / max(len(acked), 1), 1) if server.cpu_s
        else None,
        "server_starts": server.starts, "downtime_s": None if downtime_s is None else round(downtime_s, 2),
        "wall_s": round(wall_s, 1), "saves_per_s": round(len(acked) / wall_s, 1),
        "verify_exit": verify.returncode, "verify_summary": (verify.stdout + verify.stderr).strip().splitlines()[-1:],
        "lost_tokens": lost[:10], "duplicated_tokens": duplicated[:10],
    }
    return figures


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--reads", type=int, default=50, help="reads saved by each reader")
    parser.add_argument("--cases", type=int, default=10, help="cases in each reader's package (reads cycle through "
                        "them: the rest are revisions)")
    parser.add_argument("--work", default=str(REPO / "results" / "reading_service"), help="cohort and run folders")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmark_reading_service.json"))
    parser.add_argument("--only", choices=("steady", "kill"), help="run one of the two runs")
    parser.add_argument("--think-seconds", type=float, default=0.0, help="mean pause before each read (0: every "
                        "reader saves back to back, the heaviest load; a real read takes minutes)")
    args = parser.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    template, readers = build_template(work / "template", args.readers, args.cases)
    print(f"cohort: {args.cases} case(s) x {len(readers)} reader(s) in {template} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    runs = {}
    for name, kill in (("steady", False), ("kill", True)):
        if args.only and args.only != name:
            continue
        runs[name] = run_once(template, work / name, readers, args.reads, kill, args.think_seconds)
        print(f"{name}: " + json.dumps(runs[name], indent=2), flush=True)
    summary = {"command": "python benchmarks/reading_service.py " + " ".join(sys.argv[1:]), "cpu_count": os.cpu_count(),
               "cases_per_reader": args.cases, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    ok = all(r["lost"] == 0 and r["duplicated"] == 0 and r["verify_exit"] == 0 and r["n_errors"] == 0
             for r in runs.values())
    for name, r in runs.items():
        lat = r["save_latency_ms"]
        print(f"{name:6s}: {r['acknowledged']}/{r['reads_attempted']} acknowledged, {r['found_in_databases']} in the "
              f"databases, lost {r['lost']}, duplicated {r['duplicated']}, stored unacknowledged "
              f"{r['stored_not_acknowledged']}, errors {r['n_errors']}; save p50 {lat['p50']} ms, p95 {lat['p95']} ms; "
              f"server peak RSS {r['server_peak_rss_mib']} MiB; qa verify exit {r['verify_exit']}")
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
