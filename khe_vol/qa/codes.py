"""Case codes and reading order: what a reader sees instead of a participant and session.

Case codes are HMAC-SHA256(seed, ``reader|participant|session``) written in
Crockford base32: deterministic (a rebuild gives the same codes and bytes),
different per reader (two readers cannot line their worklists up), and
impossible to invert without the seed. The seed therefore goes only into the
key: a reader who knew it could compute the code of any participant. Use a
large random seed (``python -c "import secrets; print(secrets.randbits(63))"``);
a small one could be found by trying them all.
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

#: Crockford base32 (no I, L, O, U): no look-alike characters for readers to mistype.
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: A code starts with a letter, so it is never a number or a date.
CODE_LETTERS = CODE_ALPHABET[10:]
#: 10 characters = 49 bits: collisions are negligible for any trial, and still checked.
CODE_LENGTH = 10


def _hmac_int(seed, message):
    key = str(int(seed)).encode("ascii")
    return int.from_bytes(hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest(), "big")


def case_code(seed, reader, participant_id, session_id):
    """The code a reader sees for one series.

    Parameters
    ----------
    seed : int
        Secret seed of the package (non-negative).
    reader, participant_id, session_id : str

    Returns
    -------
    str
        ``CODE_LENGTH`` Crockford base32 characters, first one a letter. A
        single unbroken run of letters and digits, so the leak audit's
        whole-word matching can never find a short id *inside* a code.
    """
    return _code(_hmac_int(seed, f"{reader}|{participant_id}|{session_id}"), CODE_LENGTH)


def _code(n, length):
    """``length`` Crockford base32 characters from the integer ``n``, the first one a letter."""
    chars = [CODE_LETTERS[n % len(CODE_LETTERS)]]
    n //= len(CODE_LETTERS)
    for _ in range(length - 1):
        chars.append(CODE_ALPHABET[n % len(CODE_ALPHABET)])
        n //= len(CODE_ALPHABET)
    return "".join(chars)


#: Characters after ``P-`` in a participant code (30 bits: collisions are checked, and rare).
PARTICIPANT_CODE_LENGTH = 6


def participant_code(seed, reader, participant_id):
    """The blinded participant label a reader sees in longitudinal reading, e.g. ``P-K3X9QD``.

    HMAC of the seed like :func:`case_code` (another message, so it is not
    any case code): different per reader, not invertible without the seed,
    and its part after ``P-`` is one unbroken run starting with a letter, so
    the leak audit can never find a participant id inside it.
    """
    return "P-" + _code(_hmac_int(seed, f"participant|{reader}|{participant_id}"), PARTICIPANT_CODE_LENGTH)


def reader_int(reader):
    """A stable 64-bit integer from a reader id (for seeding that reader's shuffle)."""
    return int.from_bytes(hashlib.sha256(reader.encode("utf-8")).digest()[:8], "big")


def reader_order(n_cases, seed, reader):
    """Permutation giving a reader's worklist order.

    Returns
    -------
    ndarray of int, shape (n_cases,)
        ``order[p]`` is the index (in participant/session sort order) of the
        case shown at position ``p``; from ``numpy.random.default_rng([seed,
        reader_int(reader)])``, so each reader gets a different, reproducible order.
    """
    return np.random.default_rng([int(seed), reader_int(reader)]).permutation(n_cases)


def overlay_labels(seed, reader, participant_id, session_id, other_readers):
    """Blinded labels for other readers' masks shown to an adjudicator.

    The assignment of "Reader A", "Reader B", ... is shuffled per case (from
    the seed), so the adjudicator cannot learn which label is which reader
    across cases.

    Returns
    -------
    dict
        original reader id -> label.
    """
    readers = sorted(other_readers)
    rng = np.random.default_rng([int(seed), _hmac_int(seed, f"overlay|{reader}|{participant_id}|{session_id}") % 2**63])
    shuffled = [readers[i] for i in rng.permutation(len(readers))]
    return {r: f"Reader {chr(ord('A') + i)}" for i, r in enumerate(shuffled)}
