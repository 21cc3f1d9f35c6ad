"""Point sets and rotations for the phantom: columns ``(3, N)``, rigid rotations, random directions and plane waves.

Point sets are stored coordinate-first, shape ``(3, N)``, because NumPy is
far faster on contiguous coordinate rows than on ``(N, 3) @ (3, 3)``.
"""

from __future__ import annotations

import math

import numpy as np


def rotation_about(axis, angle_deg):
    """Rotation matrix about the 3-vector ``axis`` by ``angle_deg`` (right hand)."""
    axis = np.asarray(axis, dtype=float)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def euler_rotation(angles_deg):
    """Rotation about x, then y, then z (fixed axes), angles in degrees."""
    rx, ry, rz = angles_deg
    return rotation_about((0, 0, 1), rz) @ rotation_about((0, 1, 0), ry) @ rotation_about((1, 0, 0), rx)


def random_rotation(rng):
    # Uniform random rotation from a normalised Gaussian quaternion.
    w, x, y, z = rng.standard_normal(4)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def unit_vector(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def random_unit_vectors(rng, n=None):
    v = rng.standard_normal((3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_plane_waves(rng, n, wavelength_mm, total_amplitude):
    """``n`` random plane waves: wavevectors (rad/mm) for wavelengths in
    ``wavelength_mm`` (lo, hi), amplitudes summing to ``total_amplitude``, phases."""
    lam = rng.uniform(*wavelength_mm, size=n)
    w = random_unit_vectors(rng, n) * (2 * np.pi / lam)[:, None]
    amp = rng.uniform(0.5, 1.0, size=n)
    amp *= total_amplitude / amp.sum()
    return w, amp, rng.uniform(0, 2 * np.pi, size=n)


def as_columns(points_n3):
    """(N, 3) points as contiguous (3, N) float rows."""
    p = np.asarray(points_n3)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(float)
    return np.ascontiguousarray(p.reshape(-1, 3).T)


def dot_columns(P, vec, const=0.0):
    """``vec . p - const`` for each column of P, in P's dtype."""
    t = P.dtype.type
    return P[0] * t(vec[0]) + P[1] * t(vec[1]) + P[2] * t(vec[2]) - t(const)


def affine_columns(m, P, dtype=np.float64):
    """``m[:3, :3] @ P + m[:3, 3]`` for columns P (3, N), as ``dtype``.

    Row by row rather than ``@``: a (3, 3) by (3, N) product would start
    BLAS threads that only spin on this small a problem.
    """
    P = np.asarray(P)
    out = np.empty((3, P.shape[1]), dtype=dtype)
    for r in range(3):
        out[r] = m[r, 0] * P[0] + m[r, 1] * P[1] + m[r, 2] * P[2] + m[r, 3]
    return out


def cosine_field(P, wavevectors, amplitudes, phases):
    """``sum_k A_k cos(w_k . p + phi_k)`` for columns P (3, N)."""
    t_ = P.dtype.type
    acc = np.zeros(P.shape[1], dtype=P.dtype)
    for w, a, phi in zip(wavevectors, amplitudes, phases):
        arg = dot_columns(P, w, -phi)
        np.cos(arg, out=arg)
        arg *= t_(a)
        acc += arg
    return acc


def segment_distance_mm(P, a, b):
    """Distance (N,) from columns P (3, N) to the segment ``a``-``b``."""
    t_ = P.dtype.type
    d = np.asarray(b, float) - np.asarray(a, float)
    t = np.clip(dot_columns(P, d / max(float(d @ d), 1e-12), float(np.dot(a, d)) / max(float(d @ d), 1e-12)), 0, 1)
    acc = None
    for j in range(3):
        e = P[j] - t_(a[j]) - t * t_(d[j])
        acc = e * e if acc is None else acc + e * e
    return np.sqrt(acc)


def fibonacci_sphere(n):
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)])
