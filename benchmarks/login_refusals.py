"""How long each kind of failed login takes to be refused (issue 24 item 4): printed, never asserted.

Every failed login should cost one scrypt run and get one answer, so an
unknown account, a wrong password, a locked account, an account without a
password and a disabled one take the same time. The tests count the scrypt
runs (``tests/test_qa_accounts.py``); this prints the times, median of R
tries each, calling :func:`khe_vol.qa.accounts.authenticate` in-process on a
fresh accounts database.

Usage, from the repository root (about 10 s)::

    python benchmarks/login_refusals.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from khe_vol.qa import accounts

PASSWORD = "correct horse battery"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "accounts.sqlite"
        for name in ("R1", "R2", "R3"):
            accounts.enrol(db, accounts.add_account(db, name, now=0.0), PASSWORD, now=0.0)
        accounts.add_account(db, "R4", now=0.0)
        accounts.set_enabled(db, "R3", False)
        for _ in range(accounts.MAX_FAILED_LOGINS):
            try:
                accounts.authenticate(db, "R2", "wrong", now=1.0)
            except accounts.LoginRefused:
                pass
        cases = {"unknown account": ("R9", PASSWORD), "wrong password": ("R1", "wrong password!"),
                 "locked, right password": ("R2", PASSWORD), "not enrolled": ("R4", PASSWORD),
                 "disabled, wrong password": ("R3", "wrong password!")}
        print(f"{'refused login':28s} median s   answer")
        for label, (name, password) in cases.items():
            times, answer = [], None
            for _ in range(args.repeats):
                start = time.perf_counter()
                try:
                    accounts.authenticate(db, name, password, now=2.0)
                except accounts.LoginRefused as exc:
                    answer = str(exc)
                times.append(time.perf_counter() - start)
            print(f"{label:28s} {statistics.median(times):8.3f}   {answer[:40]}...")


if __name__ == "__main__":
    main()
