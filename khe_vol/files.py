"""Files: atomic writes, TSV tables, series records and where their masks are.

Every result khe-vol writes goes through here, so the rules are in one place:

* **Atomic**: a file is written to a temporary sibling and renamed over the
  target (:func:`atomic_write_bytes`); a folder is built in a temporary
  sibling and swapped in (:func:`replacing_dir`). A crash never leaves a
  half-written result.
* **TSV** (BIDS tabular): tab-separated, one header line, no quoting, ``n/a``
  for a missing value, no tab or line break inside a cell
  (:func:`tsv_text`, :func:`read_tsv`). Tables a person saved from a
  spreadsheet are decoded by :func:`read_text_table`.
* **Series records**: the per-series job writes ``record.json`` and its mask
  ``mask.nii.gz`` side by side in one folder (:func:`series_record_path`,
  :func:`series_mask_path`, :func:`mask_beside`).

Standard library only: importing this module loads no imaging library.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

#: A missing value in every table (BIDS tabular convention).
NA = "n/a"

#: File names of one series' outputs, side by side in its folder.
RECORD_NAME = "record.json"
MASK_NAME = "mask.nii.gz"


# ---------------------------------------------------------------- atomic writes


_UMASK_LOCK = threading.Lock()


def current_umask():
    """The process's file-creation mask (e.g. ``0o022``).

    Read from ``/proc/self/status`` where there is one; elsewhere set and
    restored under a lock (``os.umask`` can only be read by changing it).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path, payload, mode=None):
    """Write bytes to ``path`` via a temporary file and an atomic rename.

    Parameters
    ----------
    path : str or Path
    payload : bytes
    mode : int, optional
        Permission bits the file has from its creation (``0o600`` for a
        secret). By default those of any new file, ``0o666`` less the user's
        umask: the temporary file ``mkstemp`` makes is 0600, and results
        others of the study must read (tables, masks, the workbook) would
        otherwise stay private to whoever ran the workflow.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text, mode=None):
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


@contextmanager
def replacing_dir(out_dir):
    """Build a folder aside and swap it in for ``out_dir`` when the block ends.

    Yields the temporary sibling ``.<name>.tmp`` (emptied first) to write
    into; on success ``out_dir`` is replaced by it as a whole, so a crash
    never leaves a half-written folder (an exception leaves ``out_dir`` as
    it was).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def sha256_file(path):
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- TSV

_LINE_BREAK_OR_TAB = re.compile(r"[\t\r\n]")


def tsv_cell(value, keep_spaces=False):
    """One TSV cell: ``n/a`` for None or an empty string, never a tab or a line break.

    Parameters
    ----------
    value : object
        Written as ``str(value)``.
    keep_spaces : bool
        False (free text, e.g. messages): every run of whitespace becomes one
        space and the ends are trimmed. True (paths and ids that must read
        back exactly): only tabs and line breaks become spaces.
    """
    if value is None or value == "":
        return NA
    text = str(value)
    return _LINE_BREAK_OR_TAB.sub(" ", text) if keep_spaces else " ".join(text.split())


def tsv_text(columns, rows, keep_spaces=False):
    """A TSV as text: header line, then one line per row (dicts; a missing key is ``n/a``)."""
    columns = list(columns)
    lines = ["\t".join(columns)]
    lines += ["\t".join(tsv_cell(row.get(col), keep_spaces) for col in columns) for row in rows]
    return "\n".join(lines) + "\n"


def write_tsv(path, columns, rows, keep_spaces=False):
    """Write :func:`tsv_text` to ``path`` atomically."""
    atomic_write_text(path, tsv_text(columns, rows, keep_spaces))


def tsv_dict_reader(text, quoted=False):
    """A :class:`csv.DictReader` over TSV text (``quoted``: honour ``"..."`` quoting)."""
    quoting = csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE
    return csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting)


def tsv_number(text):
    """A finite float from a table cell, or ``None`` (``n/a``, empty, junk, nan, inf)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_tsv(path):
    """Rows of a TSV file as dicts (header line = column names, values as written).

    UTF-8, with or without a byte-order mark; blank lines are skipped.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(tsv_dict_reader(fh.read()))


def read_tsv_table(path):
    """Header and rows (lists of strings) of a TSV, every row as long as the header.

    Raises
    ------
    ValueError
        Naming the file (and line): an empty file, or a row with another
        number of fields than the header.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        lines = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header line")
    header, rows = lines[0], lines[1:]
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} fields, header has {len(header)}")
    return header, rows


#: Byte-order marks a spreadsheet may write, longest first (UTF-32's starts like UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text_table(path, what):
    """The text of a table a person may have saved from a spreadsheet.

    UTF-8 with or without a byte-order mark (Excel's "UTF-8" formats write
    one), and UTF-16 or UTF-32 with one (Excel's "Unicode Text", tab-separated);
    line ends as saved (``csv`` reads CRLF). Anything else is refused rather
    than guessed: a wrong guess would change participant ids.

    Parameters
    ----------
    path : path-like
        The file.
    what : str
        What the table is, for the message (e.g. "seeds table").

    Returns
    -------
    str

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        Naming the file, the encoding tried and how to save it instead.
    """
    raw = Path(path).read_bytes()
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    how = ("save it as tab-separated text in UTF-8, or as UTF-16 with a byte-order mark "
           "(Excel: 'Unicode Text')")
    name = encoding.upper().replace("-SIG", "")
    try:
        text = raw.decode(encoding).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: {what} is not {name} text (byte {raw[exc.start]:#04x} at offset {exc.start}: {exc.reason}); {how}"
        ) from None
    if "\0" in text:  # UTF-16 without a byte-order mark decodes as "UTF-8" with NUL between letters
        raise ValueError(f"{path}: {what} is not {name} text (it holds NUL bytes: UTF-16 without a byte-order mark?); {how}")
    return text


# ---------------------------------------------------------------- series records


def _series_dir(work_dir, participant_id, session_id):
    # Joined as written, not normalised: Snakemake matches these paths exactly.
    return f"{work_dir}/series/{participant_id}/{session_id}"


def series_record_path(work_dir, participant_id, session_id):
    """``<work_dir>/series/<participant>/<session>/record.json``: one series' record (str)."""
    return f"{_series_dir(work_dir, participant_id, session_id)}/{RECORD_NAME}"


def series_mask_path(work_dir, participant_id, session_id):
    """The mask beside that record, ``.../mask.nii.gz`` (str)."""
    return f"{_series_dir(work_dir, participant_id, session_id)}/{MASK_NAME}"


def mask_beside(record_path):
    """The mask the per-series job writes beside a ``record.json`` (a :class:`~pathlib.Path`)."""
    return Path(record_path).with_name(MASK_NAME)


def read_records(paths):
    """Series records from ``record.json`` files, or from JSON lists of them (the reads' final records)."""
    records = []
    for path in paths:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
        records.extend(loaded if isinstance(loaded, list) else [loaded])
    return records


def create_private(path):
    """Create ``path`` (and its folder) readable and writable by its owner only (0600), if it does not exist.

    An existing file that others may read or write (one from before this rule, or copied in) is made 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)


def connect_private_db(path, schema):
    """Open (creating 0600 if needed) an SQLite database of reads or accounts.

    Autocommit mode (``isolation_level=None``, transactions explicit), rows as
    :class:`sqlite3.Row`, WAL journal with ``synchronous=FULL`` (committed is on
    disk), ``schema`` applied. SQLite gives its -wal/-shm files the same bits.
    """
    create_private(path)
    con = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(schema)
    return con


class _Pooled:
    """An open connection of the pool, with the file it was opened on and the set-ups already run on it."""

    __slots__ = ("con", "ident", "done")

    def __init__(self, con, ident):
        self.con, self.ident, self.done = con, ident, set()


def _file_ident(path):
    """``(device, inode)`` of a database file (None: gone), making it 0600 again if others may read it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077:
        os.chmod(path, 0o600)
    return st.st_dev, st.st_ino


class ConnectionPool:
    """Open connections to private databases, kept between uses (a long-running service's).

    A connection is opened, its PRAGMAs set and its schema (and any ``setup``) run once; then it is
    lent to one thread at a time (:func:`private_db`) and given back with no transaction open. So a
    request does not pay for opening, for re-running ``CREATE ... IF NOT EXISTS``, nor for the
    checkpoint SQLite runs when the last connection to a WAL database closes. Durability is the same:
    every connection is WAL with ``synchronous=FULL``, so a COMMIT is on disk when it returns.

    A file replaced or removed behind the pool's back (another inode) gets a new connection; a
    connection that raised an SQLite error, or that comes back inside a transaction, is closed.
    """

    def __init__(self, max_idle_per_file=4):
        self.max_idle_per_file = int(max_idle_per_file)
        self._idle = {}  # resolved path -> [_Pooled]
        self._lock = threading.Lock()

    def take(self, path):
        """A pooled connection to ``path`` that is still on the same file, or None."""
        key = os.path.abspath(path)
        ident = _file_ident(key)
        stale = []
        found = None
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                item = idle.pop()
                if item.ident == ident:
                    found = item
                    break
                stale.append(item)
        for item in stale:
            item.con.close()
        return found

    def give(self, path, item):
        """Keep ``item`` for the next use (closed instead when too many are idle)."""
        key = os.path.abspath(path)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle_per_file:
                idle.append(item)
                return
        item.con.close()

    def close(self):
        """Close every idle connection (the last close of a WAL database checkpoints it into the main file)."""
        with self._lock:
            items = [item for idle in self._idle.values() for item in idle]
            self._idle.clear()
        for item in items:
            item.con.close()


#: The pool in use, or None (the default: every use opens and closes its own connection).
_POOL = None


def reuse_connections(pool=None):
    """Keep private-database connections open between uses, in this process (the reading service does).

    Returns the previous pool (None: none), so a caller (a test) can put it back; ``pool=False`` stops
    reusing (its idle connections are closed).
    """
    global _POOL
    previous = _POOL
    _POOL = None if pool is False else (pool or ConnectionPool())
    if pool is False and previous is not None:
        previous.close()
    return previous


@contextmanager
def private_db(path, schema, setup=None):
    """A connection to a private database (:func:`connect_private_db`) for one use, in autocommit mode.

    Without a pool (:func:`reuse_connections`) it is opened and closed around the block. With one, a
    kept connection is lent (``schema`` and ``setup(con)`` run once per connection, not per use) and
    given back afterwards; a transaction the block left open is rolled back first.
    """
    pool = _POOL
    item = pool.take(path) if pool is not None else None
    if item is None:
        con = connect_private_db(path, schema)
        item = _Pooled(con, _file_ident(path))
        item.done.add(schema)
        if setup is not None:
            try:
                setup(con)
            except BaseException:
                con.close()
                raise
            item.done.add(setup)
    try:
        if schema not in item.done:  # a connection opened by another module on the same file
            item.con.executescript(schema)
            item.done.add(schema)
        if setup is not None and setup not in item.done:
            setup(item.con)
            item.done.add(setup)
        yield item.con
    except sqlite3.Error:
        item.con.close()  # an error of the database itself: never lend that connection again
        raise
    except BaseException:
        _give_back(pool, path, item)
        raise
    _give_back(pool, path, item)


def _give_back(pool, path, item):
    if pool is None:
        item.con.close()
        return
    try:
        if item.con.in_transaction:
            item.con.execute("ROLLBACK")
    except sqlite3.Error:
        item.con.close()
        return
    pool.give(path, item)


@contextmanager
def write_transaction(path, schema, setup=None):
    """A private database (:func:`private_db`) inside one ``BEGIN IMMEDIATE`` transaction.

    Committed when the block ends, rolled back (and the exception passed on)
    when it raises; the connection is closed (or given back to the pool) either way.
    """
    with private_db(path, schema, setup) as con:
        con.execute("BEGIN IMMEDIATE")  # the write lock before reading what the write depends on
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
