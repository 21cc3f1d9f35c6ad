"""Synthetic fat-suppressed T2 series of KHE lesions, with exact volume truth.

The anatomy of one participant is a set of continuous shapes in a *body
frame* (mm; x to the participant's right, y anterior, z superior, origin on
the trunk's axis):

* an elliptic-cylinder trunk: skin, a suppressed subcutaneous fat rim,
  muscle crossed by two thin intermuscular fat planes, and a posterior bone
  with a dark cortex and suppressed marrow;
* the lesion, the set where an implicit function is positive: the union of
  a few ellipsoidal lobes whose margin is perturbed by a smooth random field.
  Inside it the signal varies smoothly by about +-15 % and there are thin
  dark septa (discs) and small flow voids (tubes); outside it lies a thin,
  partial oedema rim;
* a bright vessel whose wall passes 0.5-2 mm from the lesion and a very
  bright fluid collection touching it (0-0.6 mm away): partial volume
  bridges both to the lesion, so a naive region grower leaks into them.

A session places the body in scanner RAS+ space with a rigid transform
(repositioning) and, for follow-ups, scales the lesion about its centre by
``ratio ** (1/3)``, so the follow-up volume is exactly ``ratio`` times the
baseline volume (a growing lesion overrides the vessel and fluid it reaches). A series is rendered by mapping sub-samples of every voxel
(2 x 2 in plane, at least 3 through the slice) into the body frame and
averaging, then applying a smooth bias field and Rician noise.

Nominal signal before bias, relative to muscle (``MUSCLE_SIGNAL`` = 100):

=============  ==============  ==========================================
tissue         x muscle        notes
=============  ==============  ==========================================
air            0               Rician noise floor only
skin           0.9-1.0         outer 1.5 mm of the body
fat            0.6-0.8         subcutaneous rim, intermuscular planes
muscle         1               +-5 % smooth texture
bone cortex    0.08            dark ring; marrow 0.5-0.6
oedema rim     1.45-1.65       about half the surface, 2.5-4 mm wide
lesion         2.6-3.3         +-15 % smooth nodular heterogeneity
septa          1.1-1.3         1 mm thick discs inside the lesion
flow voids     0.2             0.8-1.4 mm radius tubes inside the lesion
vessel         1.0-1.2x lesion 2-3 mm radius, along the body axis (<= 3.9)
fluid          4-5             ellipsoid, 9-18 mm semi-axes
=============  ==============  ==========================================

Main entry points: :func:`make_anatomy` (a participant), :class:`SeriesSpec`
and :func:`render_series` (one session's series and its truth),
:func:`write_demo_cohort` (the demo study on disk); :func:`render_labels` and
:func:`tissue_labels` give the tissue of any voxel or point, for checking where
a segmentation went.

Everything is a pure function of its arguments; randomness comes only from
``numpy.random.default_rng`` seeded with integers the caller passes.
Internally, point sets are stored coordinate-first, shape ``(3, N)``, because
NumPy is far faster on contiguous coordinate rows than on ``(N, 3) @ (3, 3)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import nibabel as nib
import numpy as np

from khe_vol.geometry import voxel_to_world
from khe_vol.nifti import atomic_write_bytes, nifti_bytes

#: Nominal muscle signal; every other tissue is given relative to it.
MUSCLE_SIGNAL = 100.0

#: Tissue labels by code. From ``CORTEX`` on, a higher code wins where
#: structures overlap (so the lesion overrides vessel, fluid and bone).
TISSUES = (
    "air", "skin", "fat", "muscle", "cortex", "marrow",
    "oedema", "fluid", "vessel", "lesion", "septum", "flow_void",
)
AIR, SKIN, FAT, MUSCLE, CORTEX, MARROW, OEDEMA, FLUID, VESSEL, LESION, SEPTUM, FLOW_VOID = range(len(TISSUES))
#: Labels inside the lesion's truth region.
LESION_LABELS = (LESION, SEPTUM, FLOW_VOID)

#: Orientation kinds of a series grid: direction cosines (columns) of the
#: (i, j, k) array axes in RAS+. The slice axis is always k.
ORIENTATIONS = {
    # axial, nibabel's canonical RAS
    "axial_ras": np.eye(3),
    # axial as DICOM stores it: i to the Left, j Posterior (negative diagonal)
    "axial_lps": np.diag([-1.0, -1.0, 1.0]),
    # coronal: i Right, j Superior, k (slices) Anterior; det < 0
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).T,
    # sagittal: i Posterior, j Superior, k (slices) Right; det < 0 (qfac -1)
    "sagittal": np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).T,
}

#: Session labels and months of the demo study.
DEMO_SESSIONS = (("baseline", 0), ("m06", 6), ("m12", 12))

_SDF_CHUNK = 500_000  # points per block for the lesion function
_RENDER_CHUNK = 1_000_000  # sub-samples per block when rendering


def _frozen(a, dtype=float):
    arr = np.array(a, dtype=dtype)
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------
# Specifications
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LesionSpec:
    """A lobulated, infiltrative lesion in its local frame.

    The local frame is the body frame translated to ``centre_mm``; every
    other position is local, in mm. The lesion is the set where
    :func:`lesion_sdf_mm` is positive.

    Attributes
    ----------
    centre_mm : (3,) ndarray
        Lesion centre in the body frame, mm; follow-up scaling is about it.
    lobe_centres_mm, lobe_semi_axes_mm : (L, 3) ndarray
        Ellipsoidal lobes: local centres and semi-axes, mm.
    lobe_rotations : (L, 3, 3) ndarray
        Columns are each lobe's axes in the local frame.
    margin_wavevectors_per_mm, margin_amplitudes_mm, margin_phases : ndarray
        Margin perturbation ``sum A cos(w . q + phi)`` (rad/mm, mm, rad).
    texture_centres_mm : (T, 3) ndarray
        Centres of Gaussian blobs of signal heterogeneity (local mm)...
    texture_widths_mm : (T,) ndarray
        ...their standard deviations (local mm)...
    texture_weights : (T,) ndarray
        ...and signed weights; see :func:`lesion_texture`.
    texture_amplitude : float
        Largest relative deviation of the lesion signal (0.15 = +-15 %).
    septa_origins_mm, septa_normals : (S, 3) ndarray
        Dark septa: discs through ``origin`` with unit ``normal``...
    septa_radii_mm : (S,) ndarray
        ...and these radii (local mm; they scale with the lesion).
    septum_thickness_mm : float
        Physical thickness of every septum (does not scale).
    void_starts_mm, void_ends_mm : (V, 3) ndarray
        Flow-void tube axes, local mm.
    void_radii_mm : (V,) ndarray
        Physical tube radii, mm.
    rim_width_mm : float
        Oedema rim width outside the lesion, physical mm.
    rim_wavevectors_per_mm, rim_phases : ndarray
        A sum of unit cosines deciding which parts of the surface have a rim...
    rim_threshold : float
        ...namely where it exceeds this.
    seed_mm : (3,) ndarray
        A deep point inside the lesion, local mm: the *ideal* seed, kept
        clear of septa and flow voids. Readers do not click there; tests
        and benchmarks use :func:`reader_seeds_ras_mm`.
    signal_rel, septum_rel, void_rel, oedema_rel : float
        Signal relative to muscle.
    """

    centre_mm: np.ndarray
    lobe_centres_mm: np.ndarray
    lobe_semi_axes_mm: np.ndarray
    lobe_rotations: np.ndarray
    margin_wavevectors_per_mm: np.ndarray
    margin_amplitudes_mm: np.ndarray
    margin_phases: np.ndarray
    texture_centres_mm: np.ndarray
    texture_widths_mm: np.ndarray
    texture_weights: np.ndarray
    texture_amplitude: float
    septa_origins_mm: np.ndarray
    septa_normals: np.ndarray
    septa_radii_mm: np.ndarray
    septum_thickness_mm: float
    void_starts_mm: np.ndarray
    void_ends_mm: np.ndarray
    void_radii_mm: np.ndarray
    rim_width_mm: float
    rim_wavevectors_per_mm: np.ndarray
    rim_phases: np.ndarray
    rim_threshold: float
    seed_mm: np.ndarray
    signal_rel: float
    septum_rel: float
    void_rel: float
    oedema_rel: float


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One participant's body, lesion, vessel and fluid in the body frame (mm).

    Attributes
    ----------
    rng_seed : int
        Seed it was made from.
    body_semi_axes_mm : (2,) ndarray
        Trunk semi-axes along x and y.
    body_taper, body_taper_wavelength_mm, body_taper_phase : float
        The cross-section scales by ``1 + taper * sin(2 pi z / wavelength + phase)``.
    skin_mm, fat_mm : float
        Skin thickness and depth of the subcutaneous fat rim (skin included).
    fascia_normals : (F, 2) ndarray
        Unit normals (x, y) of intermuscular fat planes parallel to z...
    fascia_offsets_mm : (F,) ndarray
        ...at these signed distances from the body axis...
    fascia_thickness_mm : float
        ...and this thickness.
    bone_centre_mm : (2,) ndarray
        Bone axis (parallel to z), x and y.
    bone_radius_mm, cortex_mm : float
    muscle_wavevectors_per_mm, muscle_amplitudes, muscle_phases : ndarray
        Relative muscle texture (``sum |A|`` = 0.05).
    lesion : LesionSpec
    vessel_path_mm : (P, 3) ndarray
        Polyline of the vessel axis, body frame.
    vessel_radius_mm : float
    fluid_centre_mm : (3,) ndarray
    fluid_rotation : (3, 3) ndarray
        Columns are the fluid ellipsoid's axes.
    fluid_semi_axes_mm : (3,) ndarray
    skin_rel, fat_rel, cortex_rel, marrow_rel, vessel_rel, fluid_rel : float
        Signal relative to muscle.
    baseline_volume_ml : float
        Exact lesion volume at ratio 1 (0.2 mm midpoint grid), mL.
    vessel_gap_mm, fluid_gap_mm : float
        Smallest distance from the baseline lesion to the vessel wall / the
        fluid, mm (first-order estimate, good to a few tenths of a mm).
    """

    rng_seed: int
    body_semi_axes_mm: np.ndarray
    body_taper: float
    body_taper_wavelength_mm: float
    body_taper_phase: float
    skin_mm: float
    fat_mm: float
    fascia_normals: np.ndarray
    fascia_offsets_mm: np.ndarray
    fascia_thickness_mm: float
    bone_centre_mm: np.ndarray
    bone_radius_mm: float
    cortex_mm: float
    muscle_wavevectors_per_mm: np.ndarray
    muscle_amplitudes: np.ndarray
    muscle_phases: np.ndarray
    lesion: LesionSpec
    vessel_path_mm: np.ndarray
    vessel_radius_mm: float
    fluid_centre_mm: np.ndarray
    fluid_rotation: np.ndarray
    fluid_semi_axes_mm: np.ndarray
    skin_rel: float
    fat_rel: float
    cortex_rel: float
    marrow_rel: float
    vessel_rel: float
    fluid_rel: float
    baseline_volume_ml: float
    vessel_gap_mm: float
    fluid_gap_mm: float


@dataclass(frozen=True)
class SeriesSpec:
    """How one series is acquired.

    Attributes
    ----------
    shape : tuple of 3 int
        Grid shape ``(I, J, K)``; k is the slice axis.
    voxel_mm : tuple of 3 float
        Voxel edge lengths along i, j, k in mm (in-plane, in-plane, slice).
    orientation : str
        One of :data:`ORIENTATIONS`.
    oblique_deg : float
        Extra rotation of the grid about ``oblique_axis`` (RAS+), degrees.
    oblique_axis : tuple of 3 float
    snr : float
        Nominal muscle signal over the noise sigma (before bias).
    bias_amplitude : float
        Peak relative deviation of the bias field over the grid (0.3 = +-30 %).
    rotation_deg : tuple of 3 float
        Body-to-scanner rotation about x, then y, then z (repositioning), degrees.
    translation_mm : tuple of 3 float
        Body-to-scanner translation, mm.
    fov_offset_mm : tuple of 3 float
        Field-of-view centre minus the lesion's centre, scanner RAS+ mm.
    volume_ratio : float
        Lesion volume relative to baseline (0 = lesion gone).
    rng_seed : int
        Seed of the bias field and the noise.
    subsamples : tuple of 3 int or None
        Sub-samples per voxel along i, j, k; by default 2 along in-plane
        axes and ``max(3, round(size / smallest))`` along thicker ones.
    """

    shape: tuple = (160, 160, 30)
    voxel_mm: tuple = (0.9, 0.9, 4.0)
    orientation: str = "axial_ras"
    oblique_deg: float = 0.0
    oblique_axis: tuple = (1.0, 0.0, 0.0)
    snr: float = 20.0
    bias_amplitude: float = 0.3
    rotation_deg: tuple = (0.0, 0.0, 0.0)
    translation_mm: tuple = (0.0, 0.0, 0.0)
    fov_offset_mm: tuple = (0.0, 0.0, 0.0)
    volume_ratio: float = 1.0
    rng_seed: int = 0
    subsamples: tuple | None = None

    def __post_init__(self):
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be 3 positive ints, got {self.shape}")
        if len(self.voxel_mm) != 3 or min(self.voxel_mm) <= 0:
            raise ValueError(f"voxel_mm must be 3 positive sizes in mm, got {self.voxel_mm}")
        if self.orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {sorted(ORIENTATIONS)}, got {self.orientation!r}")
        if not self.snr > 0:
            raise ValueError(f"snr must be > 0, got {self.snr}")
        if not 0 <= self.bias_amplitude < 1:
            raise ValueError(f"bias_amplitude must be in [0, 1), got {self.bias_amplitude}")
        if not self.volume_ratio >= 0:
            raise ValueError(f"volume_ratio must be >= 0, got {self.volume_ratio}")


@dataclass(frozen=True, eq=False)
class Phantom:
    """A rendered series and its truth.

    Attributes
    ----------
    image : (I, J, K) float32 ndarray
        Magnitude image (muscle about 100 before bias).
    affine : (4, 4) float64 ndarray
        Voxel-to-world RAS+ mm.
    truth_mask : (I, J, K) uint8 ndarray
        1 where the voxel centre lies inside the lesion.
    true_volume_ml : float
        Exact lesion volume of this session (``volume_ratio * baseline``), mL.
    seed_ras_mm : (3,) ndarray
        The ideal seed (the lesion's deep point ``LesionSpec.seed_mm``) in
        this session's scanner RAS+ mm (for ratio 0, where it was). Seeds as
        a reader places them: :func:`phantom_reader_seeds`.
    volume_ratio : float
    body_to_world : (4, 4) ndarray
        This session's body-frame-to-scanner transform.
    """

    image: np.ndarray
    affine: np.ndarray
    truth_mask: np.ndarray
    true_volume_ml: float
    seed_ras_mm: np.ndarray
    volume_ratio: float = 1.0
    body_to_world: np.ndarray = field(default_factory=lambda: np.eye(4))


# --------------------------------------------------------------------------
# Small geometric helpers (points coordinate-first: shape (3, N))
# --------------------------------------------------------------------------


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


def _random_rotation(rng):
    # Uniform random rotation from a normalised Gaussian quaternion.
    w, x, y, z = rng.standard_normal(4)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _random_unit(rng, n=None):
    v = rng.standard_normal((3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _random_modes(rng, n, wavelength_mm, total_amplitude):
    """``n`` random plane waves: wavevectors (rad/mm) for wavelengths in
    ``wavelength_mm`` (lo, hi), amplitudes summing to ``total_amplitude``, phases."""
    lam = rng.uniform(*wavelength_mm, size=n)
    w = _random_unit(rng, n) * (2 * np.pi / lam)[:, None]
    amp = rng.uniform(0.5, 1.0, size=n)
    amp *= total_amplitude / amp.sum()
    return w, amp, rng.uniform(0, 2 * np.pi, size=n)


def _cols(points_n3):
    """(N, 3) points as contiguous (3, N) float rows."""
    p = np.asarray(points_n3)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(float)
    return np.ascontiguousarray(p.reshape(-1, 3).T)


def _dot(P, vec, const=0.0):
    """``vec . p - const`` for each column of P, in P's dtype."""
    t = P.dtype.type
    return P[0] * t(vec[0]) + P[1] * t(vec[1]) + P[2] * t(vec[2]) - t(const)


def _apply_affine(m, P, dtype=np.float64):
    """``m[:3, :3] @ P + m[:3, 3]`` for columns P (3, N), as ``dtype``.

    Row by row rather than ``@``: a (3, 3) by (3, N) product would start
    BLAS threads that only spin on this small a problem.
    """
    P = np.asarray(P)
    out = np.empty((3, P.shape[1]), dtype=dtype)
    for r in range(3):
        out[r] = m[r, 0] * P[0] + m[r, 1] * P[1] + m[r, 2] * P[2] + m[r, 3]
    return out


def _cosine_field(P, wavevectors, amplitudes, phases):
    """``sum_k A_k cos(w_k . p + phi_k)`` for columns P (3, N)."""
    t_ = P.dtype.type
    acc = np.zeros(P.shape[1], dtype=P.dtype)
    for w, a, phi in zip(wavevectors, amplitudes, phases):
        arg = _dot(P, w, -phi)
        np.cos(arg, out=arg)
        arg *= t_(a)
        acc += arg
    return acc


def _segment_distance(P, a, b):
    """Distance (N,) from columns P (3, N) to the segment ``a``-``b``."""
    t_ = P.dtype.type
    d = np.asarray(b, float) - np.asarray(a, float)
    t = np.clip(_dot(P, d / max(float(d @ d), 1e-12), float(np.dot(a, d)) / max(float(d @ d), 1e-12)), 0, 1)
    acc = None
    for j in range(3):
        e = P[j] - t_(a[j]) - t * t_(d[j])
        acc = e * e if acc is None else acc + e * e
    return np.sqrt(acc)


# --------------------------------------------------------------------------
# Lesion shape
# --------------------------------------------------------------------------


def _sdf_cols(Q, lesion):
    """Lesion function at local columns Q (3, N), mm, Q's dtype."""
    t_ = Q.dtype.type
    best = None
    for c, ax, rot in zip(lesion.lobe_centres_mm, lesion.lobe_semi_axes_mm, lesion.lobe_rotations):
        m = rot / ax  # local -> lobe coordinates in semi-axis units
        off = c @ m
        acc = None
        for j in range(3):
            d = _dot(Q, m[:, j], off[j])
            acc = d * d if acc is None else acc + d * d
        g = t_(ax.mean()) * (1 - np.sqrt(acc))
        best = g if best is None else np.maximum(best, g)
    return best + _cosine_field(Q, lesion.margin_wavevectors_per_mm, lesion.margin_amplitudes_mm, lesion.margin_phases)


def _sdf_chunked(Q, lesion, dtype=None):
    """Lesion function of columns Q in blocks (computed in ``dtype``, default Q's)."""
    dtype = Q.dtype if dtype is None else np.dtype(dtype)
    out = np.empty(Q.shape[1], dtype=dtype)
    for start in range(0, Q.shape[1], _SDF_CHUNK):
        out[start:start + _SDF_CHUNK] = _sdf_cols(Q[:, start:start + _SDF_CHUNK].astype(dtype, copy=False), lesion)
    return out


def lesion_sdf_mm(points_local_mm, lesion):
    """Distance-like lesion function, positive inside, in mm.

    ``max_lobes(mean_semi_axis * (1 - ellipsoidal radius)) + margin field``:
    exactly the signed distance for one spherical lobe without margin field,
    otherwise its gradient norm is at most :func:`lesion_lipschitz`.

    Parameters
    ----------
    points_local_mm : (N, 3) array_like
        Points in the lesion's local frame at scale 1, mm.
    lesion : LesionSpec

    Returns
    -------
    (N,) ndarray
        In mm, float32 for float32 input, else float64.
    """
    return _sdf_chunked(_cols(points_local_mm), lesion)


def lesion_texture(Q, lesion):
    """Relative signal modulation inside the lesion at local columns Q (3, N).

    ``amplitude * tanh(sum_i w_i exp(-|q - c_i|^2 / (2 s_i^2)))``: smooth,
    nodular, and bounded by ``lesion.texture_amplitude``.
    """
    t_ = Q.dtype.type
    acc = np.zeros(Q.shape[1], dtype=Q.dtype)
    for c, width, weight in zip(lesion.texture_centres_mm, lesion.texture_widths_mm, lesion.texture_weights):
        d2 = (Q[0] - t_(c[0])) ** 2 + (Q[1] - t_(c[1])) ** 2 + (Q[2] - t_(c[2])) ** 2
        acc += t_(weight) * np.exp(d2 * t_(-0.5 / width**2))
    return t_(lesion.texture_amplitude) * np.tanh(acc)


def lesion_lipschitz(lesion):
    """Upper bound of the gradient norm of :func:`lesion_sdf_mm` (dimensionless)."""
    ax = lesion.lobe_semi_axes_mm
    lobes = float(np.max(ax.mean(axis=1) / ax.min(axis=1)))
    wavenumbers = np.linalg.norm(lesion.margin_wavevectors_per_mm, axis=1)
    margin = float(np.sum(np.abs(lesion.margin_amplitudes_mm) * wavenumbers))
    return lobes + margin


def lesion_bounds_mm(lesion, margin_mm=0.0):
    """Local box that surely contains ``{lesion_sdf_mm > -margin_mm}``.

    Parameters
    ----------
    lesion : LesionSpec
    margin_mm : float
        Also contain points down to this (negative) value of the function.

    Returns
    -------
    lo, hi : (3,) ndarray
        Corners, local mm at scale 1.
    """
    # f > -margin needs some lobe with g > -(margin + sum|A|), i.e. a point
    # inside that lobe grown by (margin + sum|A|) / mean(axes): rigorous.
    slack = float(np.sum(np.abs(lesion.margin_amplitudes_mm))) + float(margin_mm)
    los, his = [], []
    for c, ax, rot in zip(lesion.lobe_centres_mm, lesion.lobe_semi_axes_mm, lesion.lobe_rotations):
        grown = ax * (1 + slack / ax.mean())
        half = np.sqrt(((rot * grown) ** 2).sum(axis=1))
        los.append(c - half)
        his.append(c + half)
    return np.min(los, axis=0), np.max(his, axis=0)


def true_lesion_volume_ml(lesion, step_mm=0.2, levels=3):
    """Lesion volume at scale 1 on an isotropic midpoint grid, in mL.

    Equals counting which centres of a uniform ``step_mm`` grid over
    :func:`lesion_bounds_mm` lie inside the lesion, times the cell volume.
    Cells the Lipschitz bound already classifies are not refined, so it
    takes a few million evaluations instead of tens of millions. It does not
    depend on any scanner grid. The function is evaluated in float32 (its
    error, ~1e-5 mm, is far below the grid's own discretisation error).

    Parameters
    ----------
    lesion : LesionSpec
    step_mm : float
        Final grid step, mm.
    levels : int
        Halvings from the coarse cells (of ``step_mm * 2**levels``).

    Returns
    -------
    float
        Volume in mL.
    """
    lo, hi = lesion_bounds_mm(lesion)
    h = step_mm * 2**levels
    n = np.ceil((hi - lo) / h).astype(int)
    axes = [lo[a] + (np.arange(n[a]) + 0.5) * h for a in range(3)]
    cells = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    lip = lesion_lipschitz(lesion) * 1.001
    children = np.array([[dx, dy, dz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)], dtype=float).T
    count_mm3 = 0.0
    for level in range(levels + 1):
        f = _sdf_chunked(cells, lesion, np.float32)
        if level == levels:
            count_mm3 += np.count_nonzero(f > 0) * h**3
            break
        # Farther from the surface than the bound allows over the cell's
        # half-diagonal: the whole cell is inside (or outside).
        reach = lip * h * math.sqrt(3) / 2 + 1e-3  # + float32 rounding
        count_mm3 += np.count_nonzero(f > reach) * h**3
        mixed = cells[:, np.abs(f) <= reach]
        cells = (mixed[:, :, None] + children[:, None, :] * (h / 4)).reshape(3, -1)
        h /= 2
    return count_mm3 / 1000.0


def lesion_mask_on_grid(anatomy, shape, affine, body_to_world, volume_ratio=1.0):
    """Truth mask: 1 where a voxel centre lies inside the (scaled) lesion.

    Parameters
    ----------
    anatomy : Anatomy
    shape : tuple of 3 int
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm of the grid.
    body_to_world : (4, 4) array_like
        The session's pose.
    volume_ratio : float

    Returns
    -------
    (I, J, K) uint8 ndarray
    """
    shape = tuple(int(v) for v in shape)
    mask = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    s = float(volume_ratio) ** (1 / 3)
    if s == 0:
        return mask.reshape(shape)
    lesion = anatomy.lesion
    idx_to_local = np.linalg.inv(np.asarray(body_to_world, float)) @ np.asarray(affine, float)
    idx_to_local[:3, 3] -= lesion.centre_mm
    idx_to_local[:3] /= s
    Q = _apply_affine(idx_to_local, np.indices(shape).reshape(3, -1))
    lo, hi = lesion_bounds_mm(lesion)
    near = np.flatnonzero(np.all((Q >= lo[:, None]) & (Q <= hi[:, None]), axis=0))
    mask[near] = _sdf_chunked(np.ascontiguousarray(Q[:, near]), lesion) > 0
    return mask.reshape(shape)


# --------------------------------------------------------------------------
# Tissue labels of the continuous anatomy
# --------------------------------------------------------------------------


def _body_r2_depth(P, anatomy):
    """Normalised radius squared of the trunk and approximate depth under the skin (mm)."""
    t_ = P.dtype.type
    k = 2 * np.pi / anatomy.body_taper_wavelength_mm
    scale = 1 + t_(anatomy.body_taper) * np.sin(P[2] * t_(k) + t_(anatomy.body_taper_phase))
    a = t_(anatomy.body_semi_axes_mm[0]) * scale
    b = t_(anatomy.body_semi_axes_mm[1]) * scale
    u, v = P[0] / a, P[1] / b
    r2 = u * u + v * v
    # First-order distance to the ellipse: (1 - r2) / |grad r2|.
    grad = 2 * np.sqrt((u / a) ** 2 + (v / b) ** 2) + t_(1e-6)
    return r2, (1 - r2) / grad


def _classify(P, anatomy, lesion_scale, reach=None):
    """Tissue labels of body-frame columns P (3, N), and which may be mixed.

    Parameters
    ----------
    P : (3, N) float ndarray
    anatomy : Anatomy
    lesion_scale : float
    reach : (float, float) or None
        Largest distance (mm) from a point to the sub-samples of its voxel:
        within the body's x-y plane, and in 3D. When given, also returns
        whether a structure boundary may pass within that reach, i.e. whether
        the voxel needs sub-sampling (conservative: Lipschitz bounds).

    Returns
    -------
    labels : (N,) int8 ndarray
    mixed : (N,) bool ndarray or None
    """
    t_ = P.dtype.type
    n = P.shape[1]
    check = reach is not None
    r_xy, r_3d = reach if check else (0.0, 0.0)
    mixed = np.zeros(n, dtype=bool) if check else None

    # Trunk: muscle, with fat then skin at decreasing depth.
    r2, depth = _body_r2_depth(P, anatomy)
    inside = r2 < 1
    fat = depth < t_(anatomy.fat_mm)
    skin = depth < t_(anatomy.skin_mm)
    lab = inside.astype(np.int8) * (np.int8(MUSCLE) - fat.astype(np.int8) - skin.astype(np.int8))
    # The depth estimate stretches distances by < 1.5 near the skin; the taper moves it slowly with z.
    depth_reach = 1.5 * r_xy + 0.2 * r_3d + 0.05
    if check:
        mixed |= (depth > -depth_reach) & (depth < anatomy.fat_mm + depth_reach)
    fascia = np.zeros(n, dtype=bool)
    for nrm, off in zip(anatomy.fascia_normals, anatomy.fascia_offsets_mm):
        plane = np.abs(P[0] * t_(nrm[0]) + P[1] * t_(nrm[1]) - t_(off))
        fascia |= plane < anatomy.fascia_thickness_mm / 2
        if check:
            mixed |= (plane < anatomy.fascia_thickness_mm / 2 + r_xy) & (depth > anatomy.fat_mm - depth_reach)
    lab -= (fascia & inside & ~fat).astype(np.int8)  # deep muscle -> fat
    bx, by = anatomy.bone_centre_mm
    rho = np.sqrt((P[0] - t_(bx)) ** 2 + (P[1] - t_(by)) ** 2)
    r_in = anatomy.bone_radius_mm - anatomy.cortex_mm
    np.maximum(lab, (inside & (rho < anatomy.bone_radius_mm)).astype(np.int8) * np.int8(CORTEX), out=lab)
    np.maximum(lab, (inside & (rho < r_in)).astype(np.int8) * np.int8(MARROW), out=lab)
    if check:
        mixed |= (np.abs(rho - anatomy.bone_radius_mm) < r_xy) | (np.abs(rho - r_in) < r_xy)

    # Fluid collection: an ellipsoid.
    rel = P - anatomy.fluid_centre_mm.astype(P.dtype)[:, None]
    big = anatomy.fluid_semi_axes_mm.max() + r_3d
    idx = np.flatnonzero((rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) < big * big)
    if idx.size:
        m = anatomy.fluid_rotation / anatomy.fluid_semi_axes_mm
        R = rel[:, idx]
        q = np.sqrt(sum(_dot(R, m[:, j]) ** 2 for j in range(3)))
        lab[idx] = np.maximum(lab[idx], (q < 1).astype(np.int8) * np.int8(FLUID))
        if check:
            mixed[idx] |= np.abs(q - 1) < r_3d / anatomy.fluid_semi_axes_mm.min()

    # Vessel: a tube around a polyline, inside the body only.
    path, r_v = anatomy.vessel_path_mm, anatomy.vessel_radius_mm
    lo, hi = path.min(axis=0) - r_v - r_3d, path.max(axis=0) + r_v + r_3d
    box = inside.copy() if not check else np.ones(n, dtype=bool)
    for j in range(3):
        box &= (P[j] >= t_(lo[j])) & (P[j] <= t_(hi[j]))
    idx = np.flatnonzero(box)
    if idx.size:
        S = P[:, idx]
        dist = np.min([_segment_distance(S, a, b) for a, b in zip(path[:-1], path[1:])], axis=0)
        lab[idx] = np.maximum(lab[idx], (inside[idx] & (dist < r_v)).astype(np.int8) * np.int8(VESSEL))
        if check:
            mixed[idx] |= np.abs(dist - r_v) < r_3d

    # Lesion, its septa and flow voids, and the oedema rim around it.
    s = float(lesion_scale)
    if s > 0:
        les = anatomy.lesion
        lip = lesion_lipschitz(les)
        w = les.rim_width_mm
        lo, hi = lesion_bounds_mm(les, margin_mm=(w + lip * r_3d) / s)
        Q = (P - les.centre_mm.astype(P.dtype)[:, None]) / t_(s)
        box = np.ones(n, dtype=bool)
        for j in range(3):
            box &= (Q[j] >= t_(lo[j])) & (Q[j] <= t_(hi[j]))
        idx = np.flatnonzero(box)
        if idx.size:
            Q = np.ascontiguousarray(Q[:, idx])
            f = _sdf_chunked(Q, les) * t_(s)  # physical mm
            cover = _cosine_field(Q, les.rim_wavevectors_per_mm, np.ones(len(les.rim_phases)), les.rim_phases)
            inl = f > 0
            rim = inside[idx] & ~inl & (f > -w) & (cover > les.rim_threshold)
            sub = np.maximum(lab[idx], rim.astype(np.int8) * np.int8(OEDEMA))
            np.maximum(sub, inl.astype(np.int8) * np.int8(LESION), out=sub)
            if check:
                band = lip * r_3d
                cover_lip = float(np.abs(np.linalg.norm(les.rim_wavevectors_per_mm, axis=1)).sum()) / s
                near_les = f > -band
                m = (np.abs(f) < band) | (np.abs(f + w) < band)
                m |= (np.abs(cover - les.rim_threshold) < cover_lip * r_3d) & (f > -w - band) & (f < band)
            for o, nrm, rad in zip(les.septa_origins_mm, les.septa_normals, les.septa_radii_mm):
                R = Q - o.astype(Q.dtype)[:, None]
                d = np.abs(_dot(R, nrm)) * t_(s)  # physical distance to the disc's plane
                ring = np.sqrt(np.maximum(R[0] ** 2 + R[1] ** 2 + R[2] ** 2 - (d / t_(s)) ** 2, 0)) * t_(s)
                hit = inl & (d < les.septum_thickness_mm / 2) & (ring < rad * s)
                np.maximum(sub, hit.astype(np.int8) * np.int8(SEPTUM), out=sub)
                if check:
                    m |= near_les & (d < les.septum_thickness_mm / 2 + r_3d) & (ring < rad * s + r_3d)
            for a, b, rad in zip(les.void_starts_mm, les.void_ends_mm, les.void_radii_mm):
                dv = _segment_distance(Q, a, b) * t_(s)
                np.maximum(sub, (inl & (dv < rad)).astype(np.int8) * np.int8(FLOW_VOID), out=sub)
                if check:
                    m |= near_les & (np.abs(dv - rad) < r_3d)
            lab[idx] = sub
            if check:
                mixed[idx] |= m
    return lab, mixed


def tissue_labels(points_body_mm, anatomy, lesion_scale=1.0):
    """Tissue label of each point of the continuous anatomy.

    Parameters
    ----------
    points_body_mm : (N, 3) array_like
        Points in the body frame, mm.
    anatomy : Anatomy
    lesion_scale : float
        Isotropic lesion scale about its centre (``volume_ratio ** (1/3)``).

    Returns
    -------
    (N,) int8 ndarray
        Codes indexing :data:`TISSUES`.
    """
    return _classify(_cols(points_body_mm), anatomy, lesion_scale)[0]


def tissue_signal(anatomy):
    """Nominal signal of each tissue label, before texture, bias and noise.

    Returns
    -------
    (len(TISSUES),) float ndarray
        Indexed by label code, in image units (muscle = ``MUSCLE_SIGNAL``).
    """
    les = anatomy.lesion
    rel = np.zeros(len(TISSUES))
    rel[SKIN] = anatomy.skin_rel
    rel[FAT] = anatomy.fat_rel
    rel[MUSCLE] = 1.0
    rel[CORTEX] = anatomy.cortex_rel
    rel[MARROW] = anatomy.marrow_rel
    rel[OEDEMA] = les.oedema_rel
    rel[FLUID] = anatomy.fluid_rel
    rel[VESSEL] = anatomy.vessel_rel
    rel[LESION] = les.signal_rel
    rel[SEPTUM] = les.septum_rel
    rel[FLOW_VOID] = les.void_rel
    return rel * MUSCLE_SIGNAL


# --------------------------------------------------------------------------
# Building an anatomy
# --------------------------------------------------------------------------


def _grid_points(lesion, step_mm):
    """Local grid points (3, N) over the lesion's box."""
    lo, hi = lesion_bounds_mm(lesion)
    axes = [np.arange(lo[a] + step_mm / 2, hi[a], step_mm) for a in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)


def _rescale_lesion_shape(lesion, k):
    """The lesion shape scaled by ``k`` about its local origin (a similarity)."""
    return replace(
        lesion,
        lobe_centres_mm=_frozen(lesion.lobe_centres_mm * k),
        lobe_semi_axes_mm=_frozen(lesion.lobe_semi_axes_mm * k),
        margin_wavevectors_per_mm=_frozen(lesion.margin_wavevectors_per_mm / k),
        margin_amplitudes_mm=_frozen(lesion.margin_amplitudes_mm * k),
        rim_wavevectors_per_mm=_frozen(lesion.rim_wavevectors_per_mm / k),
    )


def make_lesion(rng, volume_ml, *, thin_direction=(1.0, 0.0, 0.0), n_lobes=None, signal_rel=None, oedema_rel=None):
    """A random lobulated lesion of about ``volume_ml``, centred at the local origin.

    Parameters
    ----------
    rng : numpy.random.Generator
    volume_ml : float
        Target volume; the exact volume (:func:`true_lesion_volume_ml`)
        lands within about 2 %.
    thin_direction : (3,) float
        The lesion is thinnest roughly along this direction (the body wall's
        normal) and spreads across it, as KHE follows tissue planes.
    n_lobes : int, optional
        Number of ellipsoidal lobes (default 3-5).
    signal_rel, oedema_rel : float, optional
        Lesion and oedema-rim signal relative to muscle.

    Returns
    -------
    LesionSpec
        With ``centre_mm`` = 0 (place it with :func:`dataclasses.replace`).
    """
    r_eq = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    n_lobes = int(rng.integers(3, 6)) if n_lobes is None else int(n_lobes)
    # Main lobe: shortest axis near thin_direction, the others random across it.
    thin = _unit(rotation_about(_random_unit(rng), rng.uniform(0, 20)) @ _unit(thin_direction))
    e1 = _unit(np.cross(thin, _random_unit(rng)))
    centres = [np.zeros(3)]
    axes = [r_eq * np.array([rng.uniform(1.05, 1.3), rng.uniform(0.85, 1.05), rng.uniform(0.5, 0.62)])]
    rots = [np.stack([e1, np.cross(thin, e1), thin], axis=1)]
    for _ in range(n_lobes - 1):
        # Satellites spread across thin_direction more than along it.
        d = rng.standard_normal(3)
        d -= 0.75 * (d @ thin) * thin
        centres.append(_unit(d) * r_eq * rng.uniform(0.55, 0.85))
        axes.append(r_eq * rng.uniform(0.35, 0.6, size=3))
        rots.append(_random_rotation(rng))
    mw, ma, mp = _random_modes(rng, 4, (0.5 * r_eq, 1.1 * r_eq), 0.07 * r_eq)
    fw, fa, fp = _random_modes(rng, 2, (5.0, 9.0), 0.5)  # fine infiltrative ripple
    rw, _, rp = _random_modes(rng, 3, (0.8 * r_eq, 1.6 * r_eq), 1.0)
    empty3 = _frozen(np.zeros((0, 3)))
    draft = LesionSpec(
        centre_mm=_frozen(np.zeros(3)),
        lobe_centres_mm=_frozen(centres), lobe_semi_axes_mm=_frozen(axes), lobe_rotations=_frozen(rots),
        margin_wavevectors_per_mm=_frozen(np.vstack([mw, fw])),
        margin_amplitudes_mm=_frozen(np.concatenate([ma, fa])),
        margin_phases=_frozen(np.concatenate([mp, fp])),
        texture_centres_mm=empty3, texture_widths_mm=_frozen(np.zeros(0)), texture_weights=_frozen(np.zeros(0)),
        texture_amplitude=0.15,
        septa_origins_mm=empty3, septa_normals=empty3, septa_radii_mm=_frozen(np.zeros(0)),
        septum_thickness_mm=1.0,
        void_starts_mm=empty3, void_ends_mm=empty3, void_radii_mm=_frozen(np.zeros(0)),
        rim_width_mm=float(rng.uniform(2.5, 4.0)), rim_wavevectors_per_mm=_frozen(rw), rim_phases=_frozen(rp),
        rim_threshold=0.0, seed_mm=_frozen(np.zeros(3)),
        signal_rel=float(rng.uniform(2.6, 3.3) if signal_rel is None else signal_rel),
        septum_rel=float(rng.uniform(1.1, 1.3)), void_rel=0.2,
        oedema_rel=float(rng.uniform(1.45, 1.65) if oedema_rel is None else oedema_rel),
    )
    # Similarity-scale the whole shape to the target volume (volume ~ k^3).
    pts = _grid_points(draft, 1.0)
    k = (volume_ml / (np.count_nonzero(_sdf_chunked(pts, draft, np.float32) > 0) / 1000.0)) ** (1 / 3)
    draft = _rescale_lesion_shape(draft, k)

    # Seed: the centre if it is deep enough, else the deepest grid point.
    pts = _grid_points(draft, 1.0)
    f = _sdf_chunked(pts, draft, np.float32)
    f0 = float(_sdf_cols(np.zeros((3, 1)), draft)[0])
    seed = np.zeros(3) if f0 >= 0.6 * f.max() else pts[:, np.argmax(f)]

    # Nodular heterogeneity: signed Gaussian blobs spread through the lesion.
    inside = pts[:, f > 0].T
    n_blobs = 30
    blob_centres = inside[rng.integers(len(inside), size=n_blobs)] + rng.uniform(-0.5, 0.5, size=(n_blobs, 3))
    blob_widths = rng.uniform(3.0, 8.0, size=n_blobs)
    blob_weights = rng.choice([-1.0, 1.0], size=n_blobs) * rng.uniform(0.6, 1.2, size=n_blobs)

    # Septa and flow voids, kept away from the seed so that the reader's
    # click lands on lesion signal.
    deep = pts[:, f > min(4.0, 0.5 * float(f.max()))].T
    origins, normals, radii = [], [], []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(50):
            o = deep[rng.integers(len(deep))]
            nrm = _random_unit(rng)
            rad = r_eq * rng.uniform(0.3, 0.55)
            d = float((seed - o) @ nrm)
            ring = math.sqrt(max(float((seed - o) @ (seed - o)) - d * d, 0.0))
            if abs(d) > 4.0 or ring > rad + 4.0:
                origins.append(o), normals.append(nrm), radii.append(rad)
                break
    starts, ends, vradii = [], [], []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(50):
            a = deep[rng.integers(len(deep))]
            b = a + _random_unit(rng) * rng.uniform(8.0, 20.0)
            if _segment_distance(seed[:, None], a, b)[0] > 6.0:
                starts.append(a), ends.append(b), vradii.append(rng.uniform(0.8, 1.4))
                break
    return replace(
        draft,
        septa_origins_mm=_frozen(np.reshape(origins, (-1, 3))), septa_normals=_frozen(np.reshape(normals, (-1, 3))),
        septa_radii_mm=_frozen(radii), void_starts_mm=_frozen(np.reshape(starts, (-1, 3))),
        void_ends_mm=_frozen(np.reshape(ends, (-1, 3))), void_radii_mm=_frozen(vradii), seed_mm=_frozen(seed),
        texture_centres_mm=_frozen(blob_centres), texture_widths_mm=_frozen(blob_widths),
        texture_weights=_frozen(blob_weights),
    )


def _body_r2(P, semi_axes, taper, wavelength, phase):
    scale = 1 + taper * np.sin(2 * np.pi * P[2] / wavelength + phase)
    return (P[0] / (semi_axes[0] * scale)) ** 2 + (P[1] / (semi_axes[1] * scale)) ** 2


def _fibonacci_sphere(n):
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)])


def _surface_distance_mm(Q, lesion, step_mm=0.05):
    """First-order distance from local points Q (3, N) outside the lesion to
    its surface, ``-f / |grad f|`` (central differences), mm; 0 inside.

    The lesion function is only distance-like (it overstates distances
    along a lobe's short axes), so placing neighbours by it alone would put
    them too close.
    """
    Q = Q.astype(np.float32)
    f = _sdf_chunked(Q, lesion)
    grad2 = np.zeros_like(f)
    for j in range(3):
        e = np.zeros((3, 1), dtype=np.float32)
        e[j] = step_mm
        grad2 += ((_sdf_chunked(Q + e, lesion) - _sdf_chunked(Q - e, lesion)) / np.float32(2 * step_mm)) ** 2
    return np.where(f < 0, -f / np.sqrt(np.maximum(grad2, 1e-12)), 0.0)


def _first_clear_offset(lesion, centre, direction, shape_pts, clearance_mm, max_mm, step_mm=0.05):
    """Move ``shape_pts`` (3, M, body frame relative to ``centre``) along
    ``direction`` by the smallest multiple of ``step_mm`` (up to ``max_mm``)
    that keeps every point at least ``clearance_mm`` from the lesion.

    Returns
    -------
    offset_mm, gap_mm : float
        The offset and the smallest distance of the points to the lesion there.
    """
    def moved(offsets):
        P = (centre - lesion.centre_mm)[:, None, None] + direction[:, None, None] * offsets[None, :, None] \
            + shape_pts[:, None, :]
        return P.reshape(3, -1).astype(np.float32)

    def first_ok(offsets):
        g = _surface_distance_mm(moved(offsets), lesion).reshape(len(offsets), -1).min(axis=1)
        ok = np.flatnonzero(g >= clearance_mm)
        return (offsets[ok[0]], g[ok[0]]) if ok.size else None

    # Cheap scan for where all points are outside, then distance scans.
    offsets = np.arange(0.0, max_mm + 1.0, 1.0)
    outside = np.flatnonzero(_sdf_chunked(moved(offsets), lesion).reshape(len(offsets), -1).max(axis=1) < 0)
    start = offsets[outside[0]] - 1.0 if outside.size else 0.0
    coarse = first_ok(np.arange(max(start, 0.0), max_mm + 0.5, 0.5))
    if coarse is None:
        return float(max_mm), float(_surface_distance_mm(moved(np.array([max_mm])), lesion).min())
    fine = first_ok(np.round(np.arange(max(coarse[0] - 0.5, 0.0), coarse[0] + step_mm / 2, step_mm), 6))
    offset, gap = coarse if fine is None else fine
    return float(offset), float(gap)


def make_anatomy(
    rng_seed,
    *,
    lesion_volume_ml=None,
    body_semi_axes_mm=None,
    lesion_angle_deg=None,
    vessel_gap_mm=None,
    fluid_gap_mm=None,
    lesion_signal_rel=None,
    fluid_rel=None,
    volume_step_mm=0.2,
):
    """One participant's anatomy in the body frame.

    Parameters
    ----------
    rng_seed : int
        Everything random derives from ``numpy.random.default_rng(rng_seed)``.
    lesion_volume_ml : float, optional
        Target baseline lesion volume (default 40-110 mL); the exact value is
        ``Anatomy.baseline_volume_ml``.
    body_semi_axes_mm : (2,) float, optional
        Trunk semi-axes along x and y (default 68-80 and 50-60 mm).
    lesion_angle_deg : float, optional
        Direction of the lesion from the body axis in the x-y plane
        (0 = towards the participant's right; default a random flank).
    vessel_gap_mm, fluid_gap_mm : float, optional
        Smallest distance from the baseline lesion to the vessel wall
        (default 0.5-2 mm) and to the fluid (default 0-0.6 mm: touching), so
        that partial volume bridges them to the lesion.
    lesion_signal_rel, fluid_rel : float, optional
        Lesion and fluid signal relative to muscle.
    volume_step_mm : float
        Grid step of the exact baseline volume.

    Returns
    -------
    Anatomy
    """
    rng = np.random.default_rng(rng_seed)
    if body_semi_axes_mm is None:
        body_semi_axes_mm = (rng.uniform(68, 80), rng.uniform(50, 60))
    semi = np.asarray(body_semi_axes_mm, dtype=float)
    taper, taper_lambda, taper_phase = rng.uniform(0.02, 0.06), rng.uniform(200, 320), rng.uniform(0, 2 * np.pi)
    skin_mm, fat_mm = 1.5, float(rng.uniform(4.0, 7.0))
    volume_ml = rng.uniform(40, 110) if lesion_volume_ml is None else float(lesion_volume_ml)
    if lesion_angle_deg is None:
        lesion_angle_deg = rng.choice([0.0, 180.0]) + rng.uniform(-35, 35)
    direction = np.array([np.cos(np.deg2rad(lesion_angle_deg)), np.sin(np.deg2rad(lesion_angle_deg)), 0.0])
    # The body wall's normal there (gradient of the ellipse), for the lesion's thin axis.
    normal = _unit(direction / np.r_[semi**2, 1.0])
    lesion = make_lesion(rng, volume_ml, thin_direction=normal, signal_rel=lesion_signal_rel)

    # Put the lesion on the flank, as close to the skin as it fits inside
    # the body at baseline (larger follow-ups may bulge, as KHE does).
    pts = _grid_points(lesion, 1.5)
    pts = pts[:, _sdf_chunked(pts, lesion, np.float32) > 0]
    to_skin = 1 / np.hypot(direction[0] / semi[0], direction[1] / semi[1])
    limit = (1 - (skin_mm + 0.5) / semi.min()) ** 2
    best = None
    for frac in np.arange(0.8, -0.001, -0.02):
        centre = direction * to_skin * frac
        worst = _body_r2(centre[:, None] + pts, semi, taper, taper_lambda, taper_phase).max()
        if best is None or worst < best[1]:
            best = (centre, worst)
        if worst <= limit:
            best = (centre, worst)
            break
    lesion = replace(lesion, centre_mm=_frozen(best[0]))
    c = lesion.centre_mm

    # Fluid collection deep to the lesion, towards the anterior midline,
    # moved out along that direction until it just clears the lesion.
    fluid_gap = rng.uniform(0.0, 0.6) if fluid_gap_mm is None else float(fluid_gap_mm)
    u2 = rotation_about((0, 0, 1), rng.uniform(-20, 20)) @ _unit(np.array([0.0, 0.3 * semi[1], c[2]]) - c)
    u2 = _unit(u2 + np.array([0.0, 0.0, rng.uniform(-0.2, 0.2)]))
    fluid_axes = np.array([rng.uniform(10, 14), rng.uniform(9, 12), rng.uniform(12, 18)])
    fluid_rot = rotation_about(_random_unit(rng), rng.uniform(0, 25))
    sphere = _fibonacci_sphere(500)
    for _ in range(6):
        surface = fluid_rot @ (sphere * fluid_axes[:, None])
        t, fluid_gap_measured = _first_clear_offset(lesion, c, u2, surface, fluid_gap, 120.0)
        fc = c + t * u2
        inner = (1 - (fat_mm + 2) / semi.min()) ** 2
        if _body_r2(fc[:, None] + surface, semi, taper, taper_lambda, taper_phase).max() < inner:
            break
        fluid_axes = fluid_axes * 0.85  # does not fit inside the body: shrink

    # Vessel: runs roughly along the body axis beside the lesion, moved out
    # sideways until its wall clears the lesion by vessel_gap.
    vessel_gap = rng.uniform(0.5, 2.0) if vessel_gap_mm is None else float(vessel_gap_mm)
    vessel_r = float(rng.uniform(2.0, 3.0))
    u1 = np.cross([0.0, 0.0, 1.0], u2) * rng.choice([-1.0, 1.0])
    u1 = _unit(rotation_about((0, 0, 1), rng.uniform(-25, 25)) @ u1)
    tilt_axis = _unit(np.cross([0.0, 0.0, 1.0], _random_unit(rng)))
    along = rotation_about(tilt_axis, rng.uniform(5, 18)) @ np.array([0.0, 0.0, 1.0])
    side = _unit(np.cross(along, u1))
    ts = np.array([-160.0, -45.0, 0.0, 45.0, 160.0])
    bend = rng.uniform(-4, 4, size=5) * np.array([1, 1, 0, 1, 1])
    base = ts[:, None] * along + bend[:, None] * side  # (5, 3) relative to the lesion side
    # Points on the tube's wall, every ~1 mm along the stretch that can come
    # near the lesion (the lesion's box plus the lateral reach of the scan).
    lo, hi = lesion_bounds_mm(lesion)
    reach = float(np.max(np.abs(np.r_[lo, hi]))) + 20.0
    axis_pts = np.concatenate([a + np.linspace(0, 1, int(np.linalg.norm(b - a)) + 1)[:, None] * (b - a)
                               for a, b in zip(base[:-1], base[1:])])
    axis_pts = axis_pts[np.abs(axis_pts @ along) < reach]
    n1 = _unit(u1 - (u1 @ along) * along)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring = vessel_r * (np.cos(angles)[:, None] * n1 + np.sin(angles)[:, None] * side)
    wall = (axis_pts[:, None, :] + ring[None]).reshape(-1, 3).T
    t, vessel_gap_measured = _first_clear_offset(lesion, c, u1, wall, vessel_gap, 150.0)
    path = c + t * u1 + base

    muscle_w, muscle_a, muscle_p = _random_modes(rng, 4, (15.0, 40.0), 0.05)
    fascia_n = np.array([_unit(rng.standard_normal(2)) for _ in range(2)])
    fascia_off = rng.uniform(-0.5, 0.5, size=2) * semi.min()
    bone_r = float(rng.uniform(8.0, 11.0))
    return Anatomy(
        rng_seed=int(rng_seed),
        body_semi_axes_mm=_frozen(semi), body_taper=float(taper), body_taper_wavelength_mm=float(taper_lambda),
        body_taper_phase=float(taper_phase), skin_mm=skin_mm, fat_mm=fat_mm,
        fascia_normals=_frozen(fascia_n), fascia_offsets_mm=_frozen(fascia_off), fascia_thickness_mm=1.5,
        bone_centre_mm=_frozen([0.0, -semi[1] + fat_mm + bone_r + 6.0]), bone_radius_mm=bone_r, cortex_mm=2.0,
        muscle_wavevectors_per_mm=_frozen(muscle_w), muscle_amplitudes=_frozen(muscle_a),
        muscle_phases=_frozen(muscle_p),
        lesion=lesion,
        vessel_path_mm=_frozen(path), vessel_radius_mm=vessel_r,
        fluid_centre_mm=_frozen(fc), fluid_rotation=_frozen(fluid_rot), fluid_semi_axes_mm=_frozen(fluid_axes),
        skin_rel=float(rng.uniform(0.9, 1.0)), fat_rel=float(rng.uniform(0.6, 0.8)), cortex_rel=0.08,
        marrow_rel=float(rng.uniform(0.5, 0.6)),
        vessel_rel=float(min(lesion.signal_rel * rng.uniform(1.0, 1.2), 3.9)),
        fluid_rel=float(rng.uniform(4.0, 5.0) if fluid_rel is None else fluid_rel),
        baseline_volume_ml=float(true_lesion_volume_ml(lesion, step_mm=volume_step_mm)),
        vessel_gap_mm=vessel_gap_measured, fluid_gap_mm=fluid_gap_measured,
    )


# --------------------------------------------------------------------------
# Series geometry and rendering
# --------------------------------------------------------------------------


def body_to_world(series_spec):
    """4x4 rigid transform from the body frame to scanner RAS+ mm for a session."""
    m = np.eye(4)
    m[:3, :3] = euler_rotation(series_spec.rotation_deg)
    m[:3, 3] = series_spec.translation_mm
    return m


def lesion_centre_ras_mm(anatomy, series_spec):
    """Centre of the baseline lesion's bounding box in a session's scanner RAS+ mm."""
    lo, hi = lesion_bounds_mm(anatomy.lesion)
    return voxel_to_world(anatomy.lesion.centre_mm + (lo + hi) / 2, body_to_world(series_spec))


def series_affine(anatomy, series_spec):
    """Voxel-to-RAS+ affine of a series, its field of view centred on the lesion.

    Parameters
    ----------
    anatomy : Anatomy
    series_spec : SeriesSpec

    Returns
    -------
    (4, 4) float64 ndarray
    """
    spec = series_spec
    directions = ORIENTATIONS[spec.orientation]
    if spec.oblique_deg:
        directions = rotation_about(spec.oblique_axis, spec.oblique_deg) @ directions
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spec.voxel_mm, dtype=float)
    centre = lesion_centre_ras_mm(anatomy, spec) + np.asarray(spec.fov_offset_mm, dtype=float)
    mid = (np.asarray(spec.shape, dtype=float) - 1) / 2
    affine[:3, 3] = centre - affine[:3, :3] @ mid
    return affine


def subsample_offsets(voxel_mm, subsamples=None):
    """Sub-sample positions inside a voxel, in index units about its centre.

    Parameters
    ----------
    voxel_mm : (3,) float
    subsamples : (3,) int, optional
        Per axis; default 2 along axes under 1.5x the smallest and
        ``max(3, round(size / smallest))`` along thicker ones.

    Returns
    -------
    (n, 3) float ndarray
    """
    voxel_mm = np.asarray(voxel_mm, dtype=float)
    if subsamples is None:
        ratio = voxel_mm / voxel_mm.min()
        subsamples = [2 if r < 1.5 else max(3, int(round(r))) for r in ratio]
    per_axis = [(np.arange(n) + 0.5) / n - 0.5 for n in subsamples]
    return np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3)


def bias_field(points_ras_mm, rng, amplitude):
    """Smooth multiplicative bias ``1 + amplitude * t``, ``max |t| = 1`` over the points.

    ``t`` is a sum of three broad Gaussians (sigma 70-140 mm) of random sign
    plus a linear gradient, in scanner space (the coil does not move with
    the participant), with its mean over the points removed.

    Parameters
    ----------
    points_ras_mm : (N, 3) ndarray
    rng : numpy.random.Generator
    amplitude : float

    Returns
    -------
    (N,) float64 ndarray
    """
    P = _cols(points_ras_mm).astype(np.float64)
    centre = P.mean(axis=1)
    P = (P - centre[:, None]).astype(np.float32)  # float32: a smooth field needs no more
    t = np.zeros(P.shape[1], dtype=np.float32)
    for _ in range(3):
        mu = (rng.uniform(-80, 80, size=3)).astype(np.float32)
        sigma = rng.uniform(70, 140)
        d2 = (P[0] - mu[0]) ** 2 + (P[1] - mu[1]) ** 2 + (P[2] - mu[2]) ** 2
        t += np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)) * np.exp(d2 * np.float32(-0.5 / sigma**2))
    t += _dot(P, _random_unit(rng) * rng.uniform(0.002, 0.006))
    t = t.astype(np.float64)
    t -= t.mean()
    peak = np.abs(t).max()
    return 1 + amplitude * (t / peak if peak > 0 else t)


def _index_to_body(anatomy, spec):
    return np.linalg.inv(body_to_world(spec)) @ series_affine(anatomy, spec)


def render_labels(anatomy, series_spec):
    """Tissue label at every voxel centre of a series (no partial volume).

    Handy to check a segmentation against what it must not leak into
    (``VESSEL``, ``FLUID``, ``OEDEMA``).

    Returns
    -------
    (I, J, K) int8 ndarray
        Codes indexing :data:`TISSUES`.
    """
    spec = series_spec
    m = _index_to_body(anatomy, spec)
    P = _apply_affine(m, np.indices(spec.shape).reshape(3, -1))
    return _classify(P, anatomy, spec.volume_ratio ** (1 / 3))[0].reshape(spec.shape)


def render_series(anatomy, series_spec):
    """Render one fat-suppressed T2 series of a participant.

    Voxels whose centre lies farther from every tissue boundary than their
    sub-samples reach (by Lipschitz bounds) take the centre's tissue;
    the others average their sub-samples, so the result equals sub-sampling
    every voxel.

    Parameters
    ----------
    anatomy : Anatomy
    series_spec : SeriesSpec

    Returns
    -------
    Phantom
    """
    spec = series_spec
    shape = tuple(int(v) for v in spec.shape)
    affine = series_affine(anatomy, spec)
    pose = body_to_world(spec)
    m = np.linalg.inv(pose) @ affine
    s = float(spec.volume_ratio) ** (1 / 3)
    lesion = anatomy.lesion

    offsets = (m[:3, :3] @ subsample_offsets(spec.voxel_mm, spec.subsamples).T).astype(np.float32)  # (3, ns) mm
    n_sub = offsets.shape[1]
    reach = (float(np.max(np.hypot(offsets[0], offsets[1]))), float(np.max(np.linalg.norm(offsets, axis=0))))
    ijk = np.indices(shape).reshape(3, -1)
    centres = _apply_affine(m, ijk, np.float32)

    signal = tissue_signal(anatomy).astype(np.float32)
    # Lesion and muscle get a smooth per-voxel modulation; the rest is flat.
    flat_lut = signal.copy()
    flat_lut[[LESION, MUSCLE]] = 0
    lab = np.empty(centres.shape[1], dtype=np.int8)
    mixed = np.empty(centres.shape[1], dtype=bool)
    for start in range(0, lab.size, _RENDER_CHUNK):
        block = slice(start, start + _RENDER_CHUNK)
        lab[block], mixed[block] = _classify(centres[:, block], anatomy, s, reach)
    flat = flat_lut[lab]
    frac_lesion = (lab == LESION).astype(np.float32)
    frac_muscle = (lab == MUSCLE).astype(np.float32)
    todo = np.flatnonzero(mixed)
    step = max(1, _RENDER_CHUNK // n_sub)
    for start in range(0, todo.size, step):
        idx = todo[start:start + step]
        P = (centres[:, idx, None] + offsets[:, None, :]).reshape(3, -1)
        sub = _classify(P, anatomy, s)[0].reshape(idx.size, n_sub)
        flat[idx] = flat_lut[sub].mean(axis=1)
        frac_lesion[idx] = np.count_nonzero(sub == LESION, axis=1) / n_sub
        frac_muscle[idx] = np.count_nonzero(sub == MUSCLE, axis=1) / n_sub

    image = flat.astype(np.float64)
    sel = np.flatnonzero(frac_muscle)
    texture = _cosine_field(centres[:, sel], anatomy.muscle_wavevectors_per_mm, anatomy.muscle_amplitudes,
                            anatomy.muscle_phases)
    image[sel] += frac_muscle[sel] * signal[MUSCLE] * (1 + texture)
    sel = np.flatnonzero(frac_lesion)
    if sel.size:
        local = (centres[:, sel] - lesion.centre_mm.astype(np.float32)[:, None]) / np.float32(s)
        texture = lesion_texture(local, lesion)
        image[sel] += frac_lesion[sel] * signal[LESION] * (1 + texture)

    rng = np.random.default_rng(spec.rng_seed)
    world = _apply_affine(affine, ijk)
    image *= bias_field(world.T, rng, spec.bias_amplitude)
    # Rician noise: the magnitude of signal plus complex Gaussian noise.
    sigma = MUSCLE_SIGNAL / spec.snr
    real = image + rng.normal(0.0, sigma, image.size)
    imag = rng.normal(0.0, sigma, image.size)
    image = np.sqrt(real * real + imag * imag).astype(np.float32).reshape(shape)

    seed_body = lesion.centre_mm + s * lesion.seed_mm
    return Phantom(
        image=image,
        affine=affine,
        truth_mask=lesion_mask_on_grid(anatomy, shape, affine, pose, spec.volume_ratio),
        true_volume_ml=float(spec.volume_ratio) * anatomy.baseline_volume_ml,
        seed_ras_mm=voxel_to_world(seed_body, pose),
        volume_ratio=float(spec.volume_ratio),
        body_to_world=pose,
    )


def lesion_fits_fov(anatomy, series_spec, margin_voxels=1.0):
    """Whether the (scaled) lesion stays ``margin_voxels`` inside the outer voxel centres.

    Checked on the lesion's points on a 1 mm grid, so it is tight to about
    a millimetre.
    """
    s = float(series_spec.volume_ratio) ** (1 / 3)
    if s == 0:
        return True
    pts = _grid_points(anatomy.lesion, 1.0)
    pts = pts[:, _sdf_chunked(pts, anatomy.lesion, np.float32) > 0]
    m = np.linalg.inv(series_affine(anatomy, series_spec)) @ body_to_world(series_spec)
    ijk = _apply_affine(m, pts * s + anatomy.lesion.centre_mm[:, None])
    hi = np.asarray(series_spec.shape, dtype=float)[:, None] - 1 - margin_voxels
    return bool(np.all(ijk >= margin_voxels) and np.all(ijk <= hi))


# --------------------------------------------------------------------------
# Reader-placed seeds
# --------------------------------------------------------------------------

#: Default depth of a reader's click inside the lesion boundary, mm.
READER_SEED_DEPTH_MM = 3.0


def reader_seeds_ras_mm(truth_mask, affine, rng, n_seeds=1, labels=None, min_depth_mm=READER_SEED_DEPTH_MM):
    """Seeds a reader would click: anywhere in bright lesion tissue, not at its deepest point.

    A reader clicks a voxel that looks like lesion, somewhere inside it; which
    one varies from reader to reader and read to read. Candidates are the
    voxel centres of ``truth_mask``

    - at least ``min_depth_mm`` inside the lesion boundary: the distance to
      the nearest voxel centre outside the lesion (the array border counts
      as outside) is at least ``min_depth_mm`` plus half the voxel diagonal,
      since the boundary can lie anywhere between an inside and an outside
      centre;
    - with ``labels``, in bright lesion tissue: labelled ``LESION`` with no
      face neighbour labelled ``SEPTUM`` or ``FLOW_VOID`` (partial volume
      would make the voxel dark).

    Seeds are drawn from them uniformly, without replacement.

    Parameters
    ----------
    truth_mask : (I, J, K) array_like
        Non-zero = lesion, on the series grid.
    affine : (4, 4) array_like
        Voxel-to-world RAS+ mm of that grid.
    rng : numpy.random.Generator
    n_seeds : int
    labels : (I, J, K) array_like of int, optional
        Tissue codes of the grid (:func:`render_labels`).
    min_depth_mm : float

    Returns
    -------
    (n_seeds, 3) float64 ndarray
        Voxel centres in scanner RAS+ mm.

    Raises
    ------
    ValueError
        If fewer than ``n_seeds`` voxels qualify (a lesion too small or too
        thin for the depth asked).
    """
    from scipy import ndimage

    from khe_vol.geometry import voxel_sizes_mm

    mask = np.asarray(truth_mask) != 0
    affine = np.asarray(affine, dtype=float)
    spacing = voxel_sizes_mm(affine)
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    ok = mask & (depth >= float(min_depth_mm) + 0.5 * float(np.linalg.norm(spacing)))
    if labels is not None:
        labels = np.asarray(labels)
        dark = ndimage.binary_dilation((labels == SEPTUM) | (labels == FLOW_VOID),
                                       structure=ndimage.generate_binary_structure(3, 1))
        ok &= (labels == LESION) & ~dark
    candidates = np.argwhere(ok)
    if len(candidates) < n_seeds:
        raise ValueError(
            f"only {len(candidates)} voxels of bright lesion tissue lie {min_depth_mm:g} mm inside the lesion; "
            f"{n_seeds} seeds asked"
        )
    picked = candidates[np.sort(rng.choice(len(candidates), size=int(n_seeds), replace=False))]
    return voxel_to_world(picked, affine).reshape(-1, 3)


def phantom_reader_seeds(anatomy, series_spec, phantom, rng, n_seeds=1, min_depth_mm=READER_SEED_DEPTH_MM):
    """:func:`reader_seeds_ras_mm` on a rendered series, with its tissue labels.

    Parameters
    ----------
    anatomy : Anatomy
    series_spec : SeriesSpec
        The spec ``phantom`` was rendered from.
    phantom : Phantom
    rng : numpy.random.Generator
    n_seeds : int
    min_depth_mm : float

    Returns
    -------
    (n_seeds, 3) float64 ndarray
        Scanner RAS+ mm.
    """
    return reader_seeds_ras_mm(phantom.truth_mask, phantom.affine, rng, n_seeds,
                               labels=render_labels(anatomy, series_spec), min_depth_mm=min_depth_mm)


# --------------------------------------------------------------------------
# Demo cohort
# --------------------------------------------------------------------------


def true_category(volume_ratio):
    """Response category of an exact follow-up/baseline volume ratio.

    Uses :func:`khe_vol.response.classify_ratio`, so the demo truth follows
    the workflow's own thresholds.
    """
    from khe_vol.response import classify_ratio

    return classify_ratio(Fraction(repr(float(volume_ratio))))


#: The demo participants: target baseline volume (mL), volume ratios at m06
#: and m12, and each session's grid (orientation, oblique degrees, voxel mm).
DEMO_PLAN = (
    dict(volume_ml=60.0, ratios=(1.30, 1.45),  # growth
         grids=(("axial_ras", 0, (0.9, 0.9, 4.0)), ("axial_ras", 0, (0.9, 0.9, 4.0)),
                ("axial_lps", 0, (0.9, 0.9, 4.0)))),
    dict(volume_ml=85.0, ratios=(1.04, 0.95),  # no change
         grids=(("axial_lps", 0, (0.8, 0.8, 3.5)), ("axial_ras", 0, (0.9, 0.9, 4.0)),
                ("axial_lps", 12, (0.8, 0.8, 3.5)))),
    dict(volume_ml=105.0, ratios=(0.70, 0.55),  # partial involution
         grids=(("axial_lps", 15, (0.9, 0.9, 3.5)), ("axial_lps", 15, (0.9, 0.9, 3.5)),
                ("axial_lps", 8, (0.9, 0.9, 3.5)))),
    dict(volume_ml=75.0, ratios=(0.40, 0.12),  # nearly complete involution
         grids=(("sagittal", 0, (0.9, 0.9, 4.0)), ("sagittal", 6, (0.9, 0.9, 4.0)),
                ("axial_ras", 0, (0.9, 0.9, 4.0)))),
    dict(volume_ml=45.0, ratios=(0.35, 0.0),  # complete involution
         grids=(("axial_ras", 10, (0.8, 0.8, 3.0)), ("axial_lps", 0, (0.8, 0.8, 3.0)),
                ("axial_ras", 10, (0.8, 0.8, 3.0)))),
    dict(volume_ml=95.0, ratios=(0.90, 0.70),  # partial involution, grids change between sessions
         grids=(("axial_ras", 0, (1.0, 1.0, 3.0)), ("sagittal", 0, (1.0, 1.0, 4.0)),
                ("axial_lps", 0, (0.9, 0.9, 4.0)))),
)


def _child_seed(*keys):
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def demo_participant(participant_index, rng_seed=0, shape=(160, 160, 30), max_attempts=20):
    """Anatomy and the three sessions of one demo participant.

    The anatomy is re-drawn (deterministically) until the lesion fits every
    session's field of view.

    Returns
    -------
    anatomy : Anatomy
    sessions : list of (session_label, month, SeriesSpec)

    Raises
    ------
    RuntimeError
        If no draw fits (``shape`` too small for the planned lesion).
    """
    plan = DEMO_PLAN[participant_index % len(DEMO_PLAN)]
    rng = np.random.default_rng(_child_seed(rng_seed, participant_index, 1))
    ratios = (1.0,) + tuple(plan["ratios"])
    sessions = []
    for (label, month), ratio, (orient, oblique, voxel) in zip(DEMO_SESSIONS, ratios, plan["grids"]):
        # Repositioning: a few degrees and up to a few cm of table travel.
        rotation = tuple(float(v) for v in rng.uniform(-4, 4, size=3))
        translation = tuple(float(v) for v in rng.uniform([-12, -12, -40], [12, 12, 40]))
        sessions.append((label, month, SeriesSpec(
            shape=tuple(int(v) for v in shape), voxel_mm=tuple(voxel), orientation=orient, oblique_deg=float(oblique),
            oblique_axis=tuple(float(v) for v in _unit(np.array([1.0, rng.uniform(-0.5, 0.5), 0.0]))),
            snr=float(rng.uniform(15, 25)), bias_amplitude=float(rng.uniform(0.15, 0.3)),
            rotation_deg=rotation, translation_mm=translation,
            fov_offset_mm=tuple(float(v) for v in rng.uniform(-4, 4, size=3)),
            volume_ratio=float(ratio), rng_seed=_child_seed(rng_seed, participant_index, 2, month),
        )))
    for attempt in range(max_attempts):
        anatomy = make_anatomy(_child_seed(rng_seed, participant_index, 0, attempt), lesion_volume_ml=plan["volume_ml"])
        if all(lesion_fits_fov(anatomy, spec) for _, _, spec in sessions):
            return anatomy, sessions
    raise RuntimeError(f"demo participant {participant_index + 1}: the lesion does not fit a {tuple(shape)} field of view")


def nifti_gz_bytes(data, affine, dtype, descrip):
    """Gzipped NIfTI-1 bytes, the same for the same input on every call.

    Float data stored as an integer ``dtype`` gets nibabel's scl_slope /
    scl_inter; qform and sform are both the affine with code 1 (scanner).
    """
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.set_data_dtype(dtype)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode("ascii")[:79]
    return nifti_bytes(img)


#: Arms of the demo trial, experimental first.
DEMO_ARMS = ("sirolimus_prednisolone", "sirolimus")


def demo_allocation_tsv(n_participants, rng_seed=0):
    """Allocation table of the demo trial: permuted blocks of two, reproducible.

    Parameters
    ----------
    n_participants : int
        Participants ``sub-demo01`` ... allocated (may exceed those imaged).
    rng_seed : int

    Returns
    -------
    str
        TSV text with ``participant_id`` and ``arm``.
    """
    rng = np.random.default_rng([rng_seed, 2024])
    arms = []
    while len(arms) < n_participants:
        arms.extend(rng.permutation(DEMO_ARMS))
    rows = ["participant_id\tarm"] + [f"sub-demo{i + 1:02d}\t{arm}" for i, arm in enumerate(arms[:n_participants])]
    return "\n".join(rows) + "\n"


def write_demo_cohort(out_dir, n_participants=6, rng_seed=0, shape=(160, 160, 30)):
    """Write a complete demo study with exact truth.

    Layout under ``out_dir``::

        imaging/sub-demoNN/ses-{baseline,m06,m12}/anat/sub-demoNN_ses-*_T2w.nii.gz
        truth/sub-demoNN/ses-*/anat/sub-demoNN_ses-*_label-lesion_mask.nii.gz
        seeds.tsv   participant_id x y z  (baseline seed, scanner RAS+ mm: where a
                    reader clicks, bright lesion tissue >= 3 mm inside the boundary,
                    not the deepest point; :func:`reader_seeds_ras_mm`)
        truth.tsv   participant_id session_id month true_volume_ml
                    true_percent_change true_category
        allocation.tsv  participant_id arm  (randomised in blocks of two;
                    one more participant was allocated but never imaged,
                    as happens in a trial: intention to treat counts them)

    With the default six participants every response category appears at
    m12, well away from its thresholds. Series are int16 with scl_slope.
    Files are byte-identical across calls with the same arguments.

    Parameters
    ----------
    out_dir : path-like
    n_participants : int
        Beyond six, the plan repeats with new anatomy.
    rng_seed : int
    shape : tuple of 3 int
        Grid shape of every series.

    Returns
    -------
    dict
        ``imaging_dir``, ``seeds``, ``truth`` (paths), and ``series`` and
        ``truth_masks``, each ``{(participant_id, session_id): path}``.

    Raises
    ------
    RuntimeError
        If a lesion cannot be made to fit its field of view (too small a ``shape``).
    """
    out = Path(out_dir)
    series_paths, mask_paths = {}, {}
    seed_rows = ["participant_id\tx\ty\tz"]
    truth_rows = ["participant_id\tsession_id\tmonth\ttrue_volume_ml\ttrue_percent_change\ttrue_category"]
    for index in range(int(n_participants)):
        pid = f"sub-demo{index + 1:02d}"
        anatomy, sessions = demo_participant(index, rng_seed, shape)
        for label, month, spec in sessions:
            sid = f"ses-{label}"
            ph = render_series(anatomy, spec)
            stem = f"{pid}_{sid}"
            descrip = f"khe_vol phantom fs-T2w {pid} {sid} ratio={spec.volume_ratio:g} snr={spec.snr:.0f}"
            path = out / "imaging" / pid / sid / "anat" / f"{stem}_T2w.nii.gz"
            atomic_write_bytes(path, nifti_gz_bytes(ph.image, ph.affine, np.int16, descrip))
            series_paths[(pid, sid)] = path
            mpath = out / "truth" / pid / sid / "anat" / f"{stem}_label-lesion_mask.nii.gz"
            atomic_write_bytes(mpath, nifti_gz_bytes(ph.truth_mask, ph.affine, np.uint8, f"khe_vol truth {pid} {sid}"))
            mask_paths[(pid, sid)] = mpath
            if month == 0:
                seed = phantom_reader_seeds(anatomy, spec, ph, np.random.default_rng(_child_seed(rng_seed, index, 3)))[0]
                seed_rows.append(f"{pid}\t" + "\t".join(f"{v:.2f}" for v in seed))
                change, category = "n/a", "n/a"
            else:
                change = f"{(spec.volume_ratio - 1) * 100:.2f}"
                category = true_category(spec.volume_ratio)
            truth_rows.append(f"{pid}\t{sid}\t{month}\t{ph.true_volume_ml:.4f}\t{change}\t{category}")
    seeds, truth, allocation = out / "seeds.tsv", out / "truth.tsv", out / "allocation.tsv"
    atomic_write_bytes(seeds, ("\n".join(seed_rows) + "\n").encode())
    atomic_write_bytes(truth, ("\n".join(truth_rows) + "\n").encode())
    atomic_write_bytes(allocation, demo_allocation_tsv(int(n_participants) + 1, rng_seed).encode())
    return {"imaging_dir": out / "imaging", "seeds": seeds, "truth": truth, "allocation": allocation,
            "series": series_paths, "truth_masks": mask_paths}
