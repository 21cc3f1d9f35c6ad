"""The reading service: every reader and the adjudicator from one process, behind a login.

:class:`ReadingService` is a WSGI application. Its own small Flask app (the
*gate*) answers ``/login``, ``/logout``, ``/enrol``, ``/api/session`` and the
shared static files; every other request must carry a valid session and is
passed on, unchanged, to the logged-in account's own reader app
(:func:`khe_vol.qa.app.create_app` for ``R/qa/<account>/``, built on first
use). A reader therefore only ever reaches their own package and reads
database: another reader's case code is simply not in their worklist (404).

Sessions are server-side (table ``sessions`` in the accounts database): the
cookie carries a random session id inside Flask's signed session (key in
``R/reads/service.key``, created 0600), the database keeps its SHA-256, the
account, the account's ``epoch`` at login, the session's CSRF token and the
session's signing verifier (:func:`khe_vol.qa.accounts.signing_verifier` of
the password scrypt checked at login, keyed by the session id under the
service key, neither of which the database holds): a
verdict signed later in the session is checked against it in microseconds
(21 CFR 11.200(a)(1): later signings in one continuous session need one
component known only to the reader, the password), anything that does not
match it by scrypt as at login.
Every request re-checks the account's current epoch
(one read of the session joined with its account): a disabled or reset account is
logged out at its next request. Every POST past the gate must send the
session's CSRF token in ``X-CSRF-Token`` (the pages carry it in
``<meta name="csrf-token">``; scripts get it from ``GET /api/session``).

Served by waitress (:func:`serve`), a production WSGI server, on loopback
unless told otherwise (``--host`` behind a TLS reverse proxy).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, jsonify, redirect, render_template, request, session

from khe_vol.files import atomic_write_text, create_private, private_db, reuse_connections
from khe_vol.qa import SERVE_THREADS, accounts, check_reader_id
from khe_vol.qa.app import (CSP, FORM_FIELDS_BYTES, LOCAL_HOST_NAMES, MAX_UPLOAD_BYTES, SIGNATURE_MEANING,
                            SMALL_BODY_BYTES, ViewerMissing, body_too_large_message, create_app, find_niivue,
                            host_allowed, route_body_limit)

#: How long a login lasts at most, seconds (a working day); then the reader logs in again.
SESSION_SECONDS = 12 * 3600

#: Header that carries the session's CSRF token on every state-changing request.
CSRF_TOKEN_HEADER = "X-CSRF-Token"

#: The cookie's name (one per service; the path is the whole site).
SESSION_COOKIE = "khe_vol_session"

SESSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid_sha256 TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    csrf_token TEXT NOT NULL,
    expires REAL NOT NULL,
    signing_verifier TEXT
);
"""

#: Paths the gate answers itself (no session needed, except /logout and /api/session which check it).
_GATE_PATHS = ("/login", "/logout", "/enrol", "/api/session")


def service_key_path(results_dir):
    """``R/reads/service.key``: the key that signs session cookies (0600, never in a package)."""
    return Path(results_dir) / "reads" / "service.key"


def load_secret_key(path):
    """The service's secret key, created (0600, 32 random bytes as hex) on first use.

    Raises
    ------
    ValueError
        A key file that is not 64 hex characters (naming the file).
    """
    path = Path(path)
    create_private(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not text:
        text = secrets.token_hex(32)
        # The file was created empty and 0600 above; fill it once (a concurrent first start writes the same way).
        with open(path, "r+", encoding="ascii") as fh:
            if not fh.read().strip():
                fh.seek(0)
                fh.write(text + "\n")
                fh.flush()
        text = path.read_text(encoding="ascii").strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{path}: not a service key (64 hex characters); move it away to make a new one "
                         "(every reader then logs in again)")
    return bytes.fromhex(text)


def _sha256(text):
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def service_url_path(accounts_db):
    """``R/reads/service_url.txt``: the URL readers open, noted by ``khe-vol qa serve`` beside its accounts."""
    return Path(accounts_db).parent / "service_url.txt"


def write_service_url(accounts_db, url):
    """Note the URL the service is reached at (its ``--public-url``, else ``http://host:port``)."""
    path = service_url_path(accounts_db)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, str(url).rstrip("/") + "\n")


def read_service_url(accounts_db):
    """The URL :func:`write_service_url` noted, or None (never served, or not an http(s) URL)."""
    try:
        url = service_url_path(accounts_db).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.netloc and "\n" not in url else None


def log_safe(text):
    """``text`` for one access-log field: printable ASCII kept, anything else (a newline, a quote) escaped.

    A request path is the client's to choose (``%0A`` decodes to a newline): unescaped, it could
    write a line of its own into the log.
    """
    return "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in str(text))


class Sessions:
    """Server-side login sessions, in the accounts database."""

    def __init__(self, accounts_db, secret_key=b""):
        self.accounts_db = accounts_db
        self._secret_key = bytes(secret_key)
        self._migrate()

    def _verifier_key(self, sid):
        """The signing verifier's key: the session id under the service key (the database holds neither)."""
        return hmac.new(self._secret_key, b"signing verifier\0" + sid.encode("utf-8"), hashlib.sha256).hexdigest()

    def _db(self):
        """The accounts database with its sessions table, for one use (kept open by the service's pool)."""
        return private_db(self.accounts_db, accounts.SCHEMA + SESSIONS_SCHEMA)

    def _migrate(self):
        """A sessions table from before signing verifiers gets the column (its sessions sign by scrypt once)."""
        with self._db() as con:
            if "signing_verifier" not in {r["name"] for r in con.execute("PRAGMA table_info(sessions)")}:
                con.execute("ALTER TABLE sessions ADD COLUMN signing_verifier TEXT")

    def create(self, account, epoch, now=None, password=None):
        """A new session for a logged-in account: ``(session id, csrf token)``.

        ``password``: the one scrypt has just checked at login; the session keeps its
        :func:`~khe_vol.qa.accounts.signing_verifier` (never the password) for later signatures.
        """
        now = time.time() if now is None else now
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = None if password is None else accounts.signing_verifier(self._verifier_key(sid), account, epoch,
                                                                            password)
        with self._db() as con:
            con.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            con.execute("INSERT INTO sessions (sid_sha256, account, epoch, csrf_token, expires, signing_verifier) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (_sha256(sid), account, epoch, csrf, now + SESSION_SECONDS,
                                                      verifier))
        return sid, csrf

    def sign(self, sid, account, password, now=None):
        """Check a signature's password in the live session ``sid`` of ``account``.

        Against the session's signing verifier when it has one (no scrypt); otherwise, and for any
        password that does not match it, by :func:`khe_vol.qa.accounts.authenticate` as at login
        (a wrong password counts towards the lockout). A password scrypt accepted becomes the
        session's verifier. Only a live session (not expired, account's epoch unchanged) signs.

        Returns
        -------
        khe_vol.qa.accounts.Account

        Raises
        ------
        khe_vol.qa.accounts.LoginRefused
        """
        now = time.time() if now is None else now
        with self._db() as con:
            row = con.execute("SELECT * FROM sessions WHERE sid_sha256 = ? AND account = ?",
                              (_sha256(sid), account)).fetchone()
        if row is None or row["expires"] < now:
            raise accounts.LoginRefused("the session ended: log in again")
        stored, key = row["signing_verifier"], self._verifier_key(sid)
        found = accounts.authenticate(self.accounts_db, account, str(password), now=now,
                                      verifier=None if stored is None else (key, stored))
        if found.epoch != row["epoch"]:
            raise accounts.LoginRefused("the session ended: log in again")  # reset or disabled meanwhile
        fresh = accounts.signing_verifier(key, account, found.epoch, password)
        if stored is None or not hmac.compare_digest(fresh.encode(), stored.encode()):
            with self._db() as con:
                con.execute("UPDATE sessions SET signing_verifier = ? WHERE sid_sha256 = ? AND epoch = ?",
                            (fresh, _sha256(sid), found.epoch))
        return found

    def lookup(self, sid, now=None):
        """``(account, csrf token)`` of a live session, or None (unknown, expired, or its account changed since)."""
        if not isinstance(sid, str) or not sid:
            return None
        now = time.time() if now is None else now
        with self._db() as con:
            # One read (no write, no fsync) for a live session: the session and its account's state as of now.
            row = con.execute("SELECT s.sid_sha256, s.account, s.epoch, s.csrf_token, s.expires, "
                              "a.enabled AS account_enabled, a.epoch AS account_epoch FROM sessions s "
                              "LEFT JOIN accounts a ON a.account = s.account WHERE s.sid_sha256 = ?",
                              (_sha256(sid),)).fetchone()
            if row is None:
                return None
            # Disabled, reset or re-enrolled since the login (or the account gone): the session is over.
            live_epoch = row["account_epoch"] if row["account_enabled"] else None
            if row["expires"] < now or live_epoch != row["epoch"]:
                con.execute("DELETE FROM sessions WHERE sid_sha256 = ?", (row["sid_sha256"],))
                return None
            return row["account"], row["csrf_token"]

    def end(self, sid):
        """Log a session out (nothing if unknown)."""
        if isinstance(sid, str) and sid:
            with self._db() as con:
                con.execute("DELETE FROM sessions WHERE sid_sha256 = ?", (_sha256(sid),))


def host_names(public_url=None, host=None):
    """Host header values the service answers: loopback names, the public URL's host and a bound address."""
    names = list(LOCAL_HOST_NAMES)
    if public_url:
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--public-url {public_url!r} is not an http(s) URL with a host name")
        name = parts.hostname.lower()
        names.append(f"[{name}]" if ":" in name else name)
    if host and host not in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1"):
        names.append(f"[{host.lower()}]" if ":" in host else host.lower())
    return tuple(dict.fromkeys(names))


class ReadingService:
    """The WSGI application of ``khe-vol qa serve --results-dir R``.

    Parameters
    ----------
    results_dir : path-like
        ``R``: packages in ``R/qa/<account>/``, reads in ``R/reads/<account>.sqlite``.
    accounts_db : path-like, optional
        Default ``R/reads/accounts.sqlite``.
    niivue_dir, allocation_tsv
        As :func:`khe_vol.qa.app.create_app`.
    behind_tls : bool
        Cookies are ``Secure`` (sent over HTTPS only): the service sits behind a TLS proxy. Implied
        by an ``https://`` ``public_url``.
    public_url : str, optional
        The URL readers open (e.g. ``https://reading.example.org``): its host is accepted in ``Host``.
    bind_host : str, optional
        The address the server binds (accepted in ``Host`` when it is a specific address).
    check_viewer : bool
        Refuse to start without NiiVue.
    access_log : file-like, optional
        One line per request (UTC time, client, account, request line, status);
        enrolment tokens are masked. None: no access log.

    Raises
    ------
    ViewerMissing, ValueError
    """

    def __init__(self, results_dir, accounts_db=None, niivue_dir=None, allocation_tsv=None, behind_tls=False,
                 public_url=None, bind_host=None, check_viewer=True, access_log=None):
        self.results_dir = Path(results_dir)
        self.accounts_db = Path(accounts_db) if accounts_db else accounts.default_accounts_path(results_dir)
        self.niivue_dir = str(find_niivue(niivue_dir)) if check_viewer else niivue_dir
        self.check_viewer = check_viewer
        self.access_log = access_log
        self._log_lock = threading.Lock()
        self.allocation_tsv = allocation_tsv
        self.names = host_names(public_url, bind_host)
        secret_key = load_secret_key(service_key_path(results_dir))
        self.sessions = Sessions(self.accounts_db, secret_key)
        self._apps, self._lock = {}, threading.Lock()
        # Readers who open an https:// URL are behind TLS whatever the flag says: a cookie never goes out in clear.
        self.behind_tls = bool(behind_tls) or urlsplit(public_url or "").scheme == "https"
        self.gate = self._make_gate(secret_key, self.behind_tls)

    # ---- the readers' own apps --------------------------------------------------------------

    def reader_app(self, account):
        """The account's reader app (built once), or None when the account has no package."""
        with self._lock:
            if account not in self._apps:
                try:
                    self._apps[account] = create_app(
                        self.results_dir, account, niivue_dir=self.niivue_dir, check_viewer=self.check_viewer,
                        allocation_tsv=self.allocation_tsv, allowed_hosts=self.names, accounts_db=self.accounts_db)
                except FileNotFoundError:
                    return None  # not cached: a package built later is found at the next request
            return self._apps[account]

    # ---- the gate ------------------------------------------------------------------------------

    def _make_gate(self, secret_key, behind_tls):
        gate = Flask("khe_vol.qa.app")  # the reader app's templates and static files
        gate.config.update(
            SECRET_KEY=secret_key, SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
            SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=bool(behind_tls),
            PERMANENT_SESSION_LIFETIME=SESSION_SECONDS, MAX_CONTENT_LENGTH=SMALL_BODY_BYTES,
            MAX_FORM_MEMORY_SIZE=SMALL_BODY_BYTES, MAX_FORM_PARTS=8,
        )
        svc = self

        @gate.errorhandler(413)
        def body_too_large(exc):
            return body_too_large_message(SMALL_BODY_BYTES) + "\n", 413, {"Content-Type": "text/plain; charset=utf-8"}

        @gate.after_request
        def headers(response):
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            if request.path.startswith("/static/"):
                response.headers["Cache-Control"] = "no-cache"
            else:
                response.headers["Cache-Control"] = "no-store"
            return response

        def login_page(error=None, status=200, notice=None):
            return render_template("login.html", error=error, notice=notice), status

        @gate.get("/login")
        def login_form():
            return login_page(notice="Password set: log in." if request.args.get("enrolled") else None)

        @gate.post("/login")
        def login():
            account, password = request.form.get("account", "").strip(), request.form.get("password", "")
            try:
                found = accounts.authenticate(svc.accounts_db, account, password)
            except accounts.LoginRefused as exc:
                return login_page(str(exc), 401)
            old = session.get("sid")
            svc.sessions.end(old)  # a new session id at every login (no fixation)
            sid, _ = svc.sessions.create(found.account, found.epoch, password=password)
            session.clear()
            session["sid"] = sid
            session.permanent = True
            return redirect("/", 303)

        @gate.post("/logout")
        def logout():
            live = svc.sessions.lookup(session.get("sid"))
            token = request.headers.get(CSRF_TOKEN_HEADER) or request.form.get("csrf_token", "")
            if live is not None and not hmac.compare_digest(token.encode(), live[1].encode()):
                return "the logout form is stale: reload the page", 403
            svc.sessions.end(session.get("sid"))
            session.clear()
            return redirect("/login", 303)

        @gate.get("/enrol")
        def enrol_form():
            return render_template("enrol.html", token=request.args.get("token", ""), error=None)

        @gate.post("/enrol")
        def enrol():
            token = request.form.get("token", "")
            password, again = request.form.get("password", ""), request.form.get("password2", "")
            if password != again:
                return render_template("enrol.html", token=token, error="the two passwords differ"), 400
            try:
                accounts.enrol(svc.accounts_db, token, password)
            except accounts.AccountError as exc:  # LoginRefused too
                return render_template("enrol.html", token=token, error=str(exc)), 400
            return redirect("/login?enrolled=1", 303)

        @gate.get("/api/session")
        def api_session():
            live = svc.sessions.lookup(session.get("sid"))
            if live is None:
                return jsonify(error="not logged in"), 401
            return jsonify(account=live[0], csrf_token=live[1])

        return gate

    # ---- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        if self.access_log is None:
            return self._handle(environ, start_response)

        def logged_start_response(status, headers, exc_info=None):
            self._log(environ, status.split(" ", 1)[0])
            return start_response(status, headers, exc_info)

        return self._handle(environ, logged_start_response)

    def _log(self, environ, status):
        query = environ.get("QUERY_STRING", "")
        if "token=" in query:
            query = re.sub(r"token=[^&]*", "token=***", query)  # an enrolment link is a password until spent
        target = environ.get("PATH_INFO", "") + (f"?{query}" if query else "")
        fields = [log_safe(environ.get(k, "-")) for k in ("REMOTE_ADDR", "khe_vol.account", "REQUEST_METHOD")]
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {fields[0]} {fields[1]} "
                f"\"{fields[2]} {log_safe(target)}\" {log_safe(status)}\n")
        with self._log_lock:
            try:
                self.access_log.write(line)
                self.access_log.flush()
            except (OSError, ValueError):
                pass  # a closed log never fails a request

    def _handle(self, environ, start_response):
        host = environ.get("HTTP_HOST")
        if not host_allowed(host, self.names):
            # A DNS-rebinding page arrives with its own host name; HTTP/1.0 may send none.
            return self._plain(environ, start_response, 403 if host else 400, "unknown host")
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
        # A body longer than its route can need is refused before any of it is read (the reader app
        # narrows a read's limit to its case's grid, and cuts a body sent without a length as it reads).
        limit = route_body_limit(method, path)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self._plain(environ, start_response, 400, "bad Content-Length")
        if length > limit:
            return self._plain(environ, start_response, 413, body_too_large_message(limit))
        if method not in ("GET", "HEAD"):
            # A browser says where a post comes from (Sec-Fetch-Site; Origin, which is "null" under the
            # pages' no-referrer policy): another site's page is refused before anything else.
            origin, site = environ.get("HTTP_ORIGIN"), environ.get("HTTP_SEC_FETCH_SITE")
            if (site is not None and site not in ("same-origin", "none")) or (
                    origin not in (None, "null") and not host_allowed(urlsplit(origin).netloc, self.names)):
                return self._plain(environ, start_response, 403, "cross-site request refused")
        if path in _GATE_PATHS or path.startswith("/static/"):
            return self.gate.wsgi_app(environ, start_response)
        with self.gate.request_context(environ):
            session_id = session.get("sid")
            live = self.sessions.lookup(session_id)
        if live is None:
            if method == "GET" and (path == "/" or path.startswith("/case/")):
                return self._redirect(environ, start_response, "/login")
            return self._plain(environ, start_response, 401, "not logged in (or the session ended): log in again")
        account, csrf = live
        if method not in ("GET", "HEAD"):
            sent = environ.get("HTTP_X_CSRF_TOKEN", "")
            if not hmac.compare_digest(sent.encode("latin-1", "replace"), csrf.encode()):
                return self._plain(environ, start_response, 403, "missing or wrong CSRF token: reload the page")
        try:
            check_reader_id(account)
        except ValueError:
            return self._plain(environ, start_response, 403, "this account cannot read")
        app = self.reader_app(account)
        if app is None:
            return self._plain(environ, start_response, 403,
                               f"account {account} has no worklist on this server yet: ask the core lab "
                               "to build your reader package (khe-vol qa package --reader "
                               f"{account}), then reload", html=True, csrf_token=csrf)
        environ["khe_vol.account"] = account
        environ["khe_vol.csrf_token"] = csrf
        # A verdict's signature is checked within this session (its signing verifier; see Sessions.sign).
        environ["khe_vol.sign"] = lambda password: self.sessions.sign(session_id, account, password)
        return app.wsgi_app(environ, start_response)

    def _plain(self, environ, start_response, status, message, html=False, csrf_token=None):
        with self.gate.request_context(environ):
            if html:
                body = render_template("message.html", message=message, csrf_token=csrf_token)
                response = self.gate.response_class(body, status=status, mimetype="text/html")
            else:
                response = self.gate.response_class(message + "\n", status=status, mimetype="text/plain")
            response.headers["Cache-Control"] = "no-store"
            response.headers["Content-Security-Policy"] = CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response(environ, start_response)

    def _redirect(self, environ, start_response, location):
        with self.gate.request_context(environ):
            response = redirect(location, 303)
            response.headers["Cache-Control"] = "no-store"
            return response(environ, start_response)


#: Headers a TLS proxy sets that the service believes, and only from ``trusted_proxy``: the reader's
#: address (for the access log) and the scheme. Host is the reader's own, passed on unchanged.
TRUSTED_PROXY_HEADERS = frozenset({"x-forwarded-for", "x-forwarded-proto"})


def serve(service, host="127.0.0.1", port=8765, threads=SERVE_THREADS, trusted_proxy=None):
    """Run the service on waitress until interrupted (SIGINT/SIGTERM).

    Parameters
    ----------
    trusted_proxy : str, optional
        Address of the TLS reverse proxy (``--behind-tls``: 127.0.0.1): its
        :data:`TRUSTED_PROXY_HEADERS` are believed (one hop), so the access log
        names the reader's address, not the proxy's. Every other client's
        proxy headers, and every other proxy header, are dropped.
    """
    from waitress import serve as waitress_serve

    # One process serves every request: its database connections are opened once and kept (files.ConnectionPool).
    reuse_connections()
    proxy = {} if not trusted_proxy else {"trusted_proxy": trusted_proxy, "trusted_proxy_count": 1,
                                          "trusted_proxy_headers": set(TRUSTED_PROXY_HEADERS)}
    # SIGTERM ends the server like SIGINT, so the kept connections are closed: the last close of each
    # database checkpoints its WAL into the main file (a copy of R/reads/*.sqlite alone is then whole).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        # Bodies up to the largest a read can need (each route caps its own, before parsing); waitress
        # buffers them to disk past 1 MiB, not in memory.
        waitress_serve(service, host=host, port=port, threads=threads, ident="khe-vol",
                       max_request_body_size=MAX_UPLOAD_BYTES + FORM_FIELDS_BYTES, clear_untrusted_proxy_headers=True, **proxy)
    finally:
        reuse_connections(False)


__all__ = ["ReadingService", "ViewerMissing", "serve", "SIGNATURE_MEANING", "CSRF_TOKEN_HEADER"]
