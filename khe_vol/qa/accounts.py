"""Reader accounts of the reading service: passwords, enrolment, lockout.

One SQLite database (default ``R/reads/accounts.sqlite``, created 0600)
holds an account per reader and adjudicator id. Passwords are stored as
scrypt hashes (RFC 7914, Python's :func:`hashlib.scrypt`; n=2**15, r=8,
p=1, 16-byte salt), never in clear. A new or reset account gets a one-time
enrolment token instead of a password: only its SHA-256 is stored, it
expires, and it is spent by setting a password. Repeated failed logins lock
the account for a while. Every failed login takes one scrypt run and gets the
same answer, whatever the account's state (:func:`authenticate`), so
account names cannot be found out by logging in. ``epoch`` counts password changes: a session made before the
last change (or before a reset or disable) is no longer valid.

Signing within a session (21 CFR 11.200(a)(1)): the first signing of a
continuous session of controlled access uses every component (the account
and the password, checked by scrypt at login); later signings in the same
session re-enter the password, which is checked against the session's
:func:`signing_verifier` (an HMAC keyed by a per-session key the database never
holds) in microseconds instead of another scrypt hash. Only a match is taken
on that fast path; anything else is checked by scrypt as before and a wrong
password counts towards the lockout the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from khe_vol.files import connect_private_db, private_db, write_transaction
from khe_vol.qa import check_reader_id

#: scrypt cost parameters (32 MiB and about 0.05-0.13 s of CPU per hash on the project's machines).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SCRYPT_MAXMEM = 64 * 2**20

#: Shortest accepted password, characters.
MIN_PASSWORD_CHARS = 12

#: Failed logins in a row that lock an account, and for how long, seconds.
MAX_FAILED_LOGINS = 5
LOCKOUT_SECONDS = 15 * 60

#: How long an enrolment token is valid, seconds.
ENROLMENT_SECONDS = 7 * 24 * 3600

ROLES = ("reader", "adjudicator")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS accounts (
    account TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ({", ".join(repr(r) for r in ROLES)})),
    password_hash TEXT,
    enrolment_sha256 TEXT,
    enrolment_expires REAL,
    enabled INTEGER NOT NULL DEFAULT 1,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0
);
"""


class AccountError(ValueError):
    """An account operation that cannot be done; the message says why."""


class LoginRefused(AccountError):
    """A login, enrolment or signature that did not pass; the message is safe to show.

    ``tries_left``: for a wrong password of a known account, the wrong passwords still allowed
    before the lockout (0: now locked); None otherwise. Only a signature, whose account the
    session already names, shows it: a login page does not (it would tell which accounts exist).
    """

    def __init__(self, message, tries_left=None):
        super().__init__(message)
        self.tries_left = tries_left


@dataclass(frozen=True)
class Account:
    """A reader or adjudicator who may log in."""

    account: str
    role: str
    epoch: int


def default_accounts_path(results_dir):
    """``R/reads/accounts.sqlite``: beside the reads databases, outside every reader package."""
    return Path(results_dir) / "reads" / "accounts.sqlite"


def connect(path):
    """Open (creating 0600 if needed) an accounts database, in autocommit mode."""
    return connect_private_db(path, SCHEMA)


def hash_password(password, salt=None):
    """An scrypt hash of ``password``, as ``scrypt$n$r$p$salt$hash`` (base64).

    Parameters
    ----------
    password : str
    salt : bytes, optional
        16 random bytes by default.
    """
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def password_matches(password, stored):
    """Whether ``password`` hashes to ``stored`` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_SCRYPT_MAXMEM, dklen=len(expected))
    except (ValueError, AttributeError):
        return False
    return hmac.compare_digest(got, expected)


def signing_verifier(session_key, account, epoch, password):
    """A fast verifier of a password already checked by scrypt, for later signatures in one session.

    HMAC-SHA256 keyed by ``session_key`` (the service derives it from the session id and its own key;
    the database holds neither, so a copy of it cannot test guesses) over the account, its ``epoch``
    and the password. A password change, reset or disable moves the epoch, and with it every verifier.

    Returns
    -------
    str
        64 hex characters.
    """
    message = "\0".join(("khe-vol signing verifier", str(account), str(int(epoch)), str(password)))
    return hmac.new(str(session_key).encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def check_password(password):
    """The password, or :class:`AccountError` if it is too weak to set."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > 1024:
        raise AccountError("a password has at most 1024 characters")
    return password


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _new_enrolment(con, account, now):
    token = secrets.token_urlsafe(32)
    con.execute("UPDATE accounts SET password_hash = NULL, enrolment_sha256 = ?, enrolment_expires = ?, "
                "failed_logins = 0, locked_until = 0, epoch = epoch + 1 WHERE account = ?",
                (_sha256(token), now + ENROLMENT_SECONDS, account))
    return token


def add_account(path, account, role="reader", now=None):
    """Create an account with a one-time enrolment token (no password yet).

    Returns
    -------
    str
        The enrolment token: give it to the reader (``/enrol?token=...``); it
        is not stored and cannot be shown again.

    Raises
    ------
    AccountError
        An existing account, a bad id or role.
    """
    account = check_reader_id(account)
    if role not in ROLES:
        raise AccountError(f"role {role!r} is not one of {', '.join(ROLES)}")
    with write_transaction(path, SCHEMA) as con:
        if con.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone():
            raise AccountError(f"account {account} exists; reset it instead")
        con.execute("INSERT INTO accounts (account, role) VALUES (?, ?)", (account, role))
        token = _new_enrolment(con, account, time.time() if now is None else now)
    return token


def _update(path, account, sql, params=()):
    with write_transaction(path, SCHEMA) as con:
        if not con.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone():
            raise AccountError(f"no account {account}")
        result = sql(con) if callable(sql) else con.execute(sql, (*params, account))
    return result


def reset_account(path, account, now=None):
    """Drop the password and sessions of an account; return a new enrolment token."""
    now = time.time() if now is None else now
    return _update(path, account, lambda con: _new_enrolment(con, account, now))


def set_enabled(path, account, enabled):
    """Disable (ending its sessions) or re-enable an account."""
    _update(path, account, "UPDATE accounts SET enabled = ?, epoch = epoch + 1 WHERE account = ?",
            (1 if enabled else 0,))


def enrol(path, token, password, now=None):
    """Spend an enrolment token by setting the account's password.

    Returns
    -------
    Account

    Raises
    ------
    LoginRefused
        An unknown, spent or expired token.
    AccountError
        A password too weak to set.
    """
    check_password(password)
    now = time.time() if now is None else now
    with write_transaction(path, SCHEMA) as con:
        row = con.execute("SELECT * FROM accounts WHERE enrolment_sha256 = ?",
                          (_sha256(str(token)),)).fetchone()
        if row is None or row["enrolment_expires"] is None or row["enrolment_expires"] < now:
            raise LoginRefused("this enrolment link is not valid (spent, expired or mistyped); ask for a new one")
        con.execute("UPDATE accounts SET password_hash = ?, enrolment_sha256 = NULL, enrolment_expires = NULL, "
                    "epoch = epoch + 1 WHERE account = ?", (hash_password(password), row["account"]))
        account = Account(row["account"], row["role"], row["epoch"] + 1)
    return account


#: The one answer to every failed login: an unknown account, a wrong password, a locked account (even
#: with the right password), an account without a password yet, and a disabled account with a wrong
#: password all read alike, so the answer never tells whether an account exists.
_REFUSED = (f"wrong account or password (after {MAX_FAILED_LOGINS} failed logins in a row an account is locked "
            f"for {LOCKOUT_SECONDS // 60} minutes; no password set yet: use your enrolment link)")

#: What an unknown or not yet enrolled account's password is checked against: one scrypt run, as for a real
#: account, so a refusal takes as long whoever is named. No password hashes to this all-zero digest.
_NO_PASSWORD_HASH = (f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${base64.b64encode(bytes(16)).decode()}$"
                     f"{base64.b64encode(bytes(32)).decode()}")


def authenticate(path, account, password, now=None, verifier=None):
    """Check a login (or a signature's password re-entry).

    Every failed login costs one scrypt run and gets the same answer
    (:data:`_REFUSED`), whether the account is unknown, the password wrong,
    the account locked (even with the right password), without a password
    yet, or disabled: an account's existence and state cannot be found out.
    Only the right password of a disabled account is told so.

    The scrypt hash (the costly part, ~0.1 s of CPU) is computed outside any
    write transaction, so logins and signatures of different readers hash in
    parallel; the outcome is then counted in one ``BEGIN IMMEDIATE``
    transaction against the account as it is *then*: a guess whose turn
    comes after the lockout is refused even if it was right, so concurrent
    guesses get no more answers than :data:`MAX_FAILED_LOGINS`.

    Parameters
    ----------
    verifier : (str, str), optional
        ``(session key, signing_verifier)`` of the live session signing: a password that matches it
        (same account and epoch) is right without scrypt. A mismatch proves nothing by itself and is
        checked by scrypt as usual; the outcome is counted the same way either way.

    Returns
    -------
    Account

    Raises
    ------
    LoginRefused
        :data:`_REFUSED` for any failure but one: a disabled account given its
        right password. A wrong password counts towards the lockout
        (:data:`MAX_FAILED_LOGINS` in a row lock it for :data:`LOCKOUT_SECONDS`);
        guesses while locked are not counted.
    """
    now = time.time() if now is None else now
    with private_db(path, SCHEMA) as con:
        row = con.execute("SELECT * FROM accounts WHERE account = ?", (str(account),)).fetchone()
        if row is None or row["password_hash"] is None:
            password_matches(str(password), _NO_PASSWORD_HASH)  # one scrypt run, as for a real account
            raise LoginRefused(_REFUSED)
        by_verifier = (verifier is not None and isinstance(verifier[1], str) and hmac.compare_digest(
            signing_verifier(verifier[0], row["account"], row["epoch"], password).encode(), verifier[1].encode()))
        if by_verifier and not row["failed_logins"] and _may_log_in(row, now):
            # Right, checked against the account as it is now (one SELECT: no hash computed since it was read),
            # and nothing to count: no write transaction (and no fsync) for a signature within a session.
            return Account(row["account"], row["role"], row["epoch"])
        right = by_verifier or password_matches(str(password), row["password_hash"])
        con.execute("BEGIN IMMEDIATE")
        try:
            row_now = con.execute("SELECT * FROM accounts WHERE account = ?", (row["account"],)).fetchone()
            if row_now is None or row_now["password_hash"] is None or row_now["locked_until"] > now:
                raise LoginRefused(_REFUSED)  # gone, reset or locked (maybe while the hash was computed)
            if not right or row_now["password_hash"] != row["password_hash"]:
                failed = row_now["failed_logins"] + 1
                locked = now + LOCKOUT_SECONDS if failed >= MAX_FAILED_LOGINS else 0
                con.execute("UPDATE accounts SET failed_logins = ?, locked_until = ? WHERE account = ?",
                            (0 if locked else failed, locked, row_now["account"]))
                con.execute("COMMIT")
                raise LoginRefused(_REFUSED, tries_left=0 if locked else MAX_FAILED_LOGINS - failed)
            if row_now["failed_logins"]:
                con.execute("UPDATE accounts SET failed_logins = 0 WHERE account = ?", (row_now["account"],))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    if not row_now["enabled"]:
        # Said only to whoever knows the password: to anyone else a disabled account is like any other.
        raise LoginRefused("this account is disabled; ask the core lab")
    return Account(row_now["account"], row_now["role"], row_now["epoch"])


def _may_log_in(row, now):
    """Whether an account may log in now (enrolled, enabled, not locked)."""
    return row["password_hash"] is not None and bool(row["enabled"]) and not row["locked_until"] > now


def current_epoch(path, account):
    """The account's epoch if it is enabled, else None (its sessions are over)."""
    with private_db(path, SCHEMA) as con:
        row = con.execute("SELECT enabled, epoch FROM accounts WHERE account = ?", (account,)).fetchone()
    return row["epoch"] if row is not None and row["enabled"] else None
