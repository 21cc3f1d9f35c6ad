"""The lesion: its implicit shape function, texture, exact volume, truth mask, and how a random one is drawn.

The lesion is the set where :func:`lesion_sdf_mm` is positive: the union of
a few ellipsoidal lobes whose margin is perturbed by a smooth random field,
with Gaussian-blob texture, dark septa (discs) and flow voids (tubes) inside
and a partial oedema rim outside. Positions are in the lesion's local frame
(the body frame translated to ``LesionSpec.centre_mm``), mm.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from khe_vol.synthetic.points import (
    affine_columns,
    as_columns,
    cosine_field,
    dot_columns,
    random_plane_waves,
    random_rotation,
    random_unit_vectors,
    rotation_about,
    segment_distance_mm,
    unit_vector,
)
from khe_vol.synthetic.specs import LesionSpec, frozen_array


_SDF_CHUNK = 500_000  # points per block for the lesion function


def lesion_function_block(Q, lesion):
    """Lesion function at local columns Q (3, N), mm, Q's dtype."""
    t_ = Q.dtype.type
    best = None
    for c, ax, rot in zip(lesion.lobe_centres_mm, lesion.lobe_semi_axes_mm, lesion.lobe_rotations):
        m = rot / ax  # local -> lobe coordinates in semi-axis units
        off = c @ m
        acc = None
        for j in range(3):
            d = dot_columns(Q, m[:, j], off[j])
            acc = d * d if acc is None else acc + d * d
        g = t_(ax.mean()) * (1 - np.sqrt(acc))
        best = g if best is None else np.maximum(best, g)
    return best + cosine_field(Q, lesion.margin_wavevectors_per_mm, lesion.margin_amplitudes_mm, lesion.margin_phases)


def lesion_function(Q, lesion, dtype=None):
    """Lesion function of columns Q in blocks (computed in ``dtype``, default Q's)."""
    dtype = Q.dtype if dtype is None else np.dtype(dtype)
    out = np.empty(Q.shape[1], dtype=dtype)
    for start in range(0, Q.shape[1], _SDF_CHUNK):
        out[start:start + _SDF_CHUNK] = lesion_function_block(Q[:, start:start + _SDF_CHUNK].astype(dtype, copy=False), lesion)
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
    return lesion_function(as_columns(points_local_mm), lesion)


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
        f = lesion_function(cells, lesion, np.float32)
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
    Q = affine_columns(idx_to_local, np.indices(shape).reshape(3, -1))
    lo, hi = lesion_bounds_mm(lesion)
    near = np.flatnonzero(np.all((Q >= lo[:, None]) & (Q <= hi[:, None]), axis=0))
    mask[near] = lesion_function(np.ascontiguousarray(Q[:, near]), lesion) > 0
    return mask.reshape(shape)


def lesion_grid_points(lesion, step_mm):
    """Local grid points (3, N) over the lesion's box."""
    lo, hi = lesion_bounds_mm(lesion)
    axes = [np.arange(lo[a] + step_mm / 2, hi[a], step_mm) for a in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)


def rescale_lesion_shape(lesion, k):
    """The lesion shape scaled by ``k`` about its local origin (a similarity)."""
    return replace(
        lesion,
        lobe_centres_mm=frozen_array(lesion.lobe_centres_mm * k),
        lobe_semi_axes_mm=frozen_array(lesion.lobe_semi_axes_mm * k),
        margin_wavevectors_per_mm=frozen_array(lesion.margin_wavevectors_per_mm / k),
        margin_amplitudes_mm=frozen_array(lesion.margin_amplitudes_mm * k),
        rim_wavevectors_per_mm=frozen_array(lesion.rim_wavevectors_per_mm / k),
    )


def _draw_lobes(rng, r_eq_mm, n_lobes, thin_direction):
    """Ellipsoidal lobes: a main lobe thin along ``thin_direction`` and ``n_lobes - 1`` satellites.

    Draws from ``rng`` in a fixed order (the phantoms depend on it).

    Parameters
    ----------
    rng : numpy.random.Generator
    r_eq_mm : float
        Radius of the sphere of the target volume, mm.
    n_lobes : int
    thin_direction : (3,) float
        The main lobe's shortest axis lies within 20 degrees of it.

    Returns
    -------
    centres_mm, semi_axes_mm : list of (3,) ndarray
        Local lobe centres and semi-axes, mm.
    rotations : list of (3, 3) ndarray
        Columns are each lobe's axes in the local frame.
    """
    # Main lobe: shortest axis near thin_direction, the others random across it.
    thin = unit_vector(rotation_about(random_unit_vectors(rng), rng.uniform(0, 20)) @ unit_vector(thin_direction))
    e1 = unit_vector(np.cross(thin, random_unit_vectors(rng)))
    centres = [np.zeros(3)]
    axes = [r_eq_mm * np.array([rng.uniform(1.05, 1.3), rng.uniform(0.85, 1.05), rng.uniform(0.5, 0.62)])]
    rots = [np.stack([e1, np.cross(thin, e1), thin], axis=1)]
    for _ in range(n_lobes - 1):
        # Satellites spread across thin_direction more than along it.
        d = rng.standard_normal(3)
        d -= 0.75 * (d @ thin) * thin
        centres.append(unit_vector(d) * r_eq_mm * rng.uniform(0.55, 0.85))
        axes.append(r_eq_mm * rng.uniform(0.35, 0.6, size=3))
        rots.append(random_rotation(rng))
    return centres, axes, rots


def _draft_lesion(rng, r_eq_mm, lobes, signal_rel, oedema_rel):
    """The lesion before scaling: lobes, margin field, oedema rim and signals; no texture, septa or voids.

    Parameters
    ----------
    rng : numpy.random.Generator
    r_eq_mm : float
        Radius of the sphere of the target volume, mm (sets the margin's wavelengths).
    lobes : tuple
        ``(centres_mm, semi_axes_mm, rotations)`` from :func:`_draw_lobes`.
    signal_rel, oedema_rel : float or None
        Lesion and oedema-rim signal relative to muscle (None: drawn).

    Returns
    -------
    LesionSpec
        Centred at the local origin, ``seed_mm`` = 0.
    """
    centres, axes, rots = lobes
    mw, ma, mp = random_plane_waves(rng, 4, (0.5 * r_eq_mm, 1.1 * r_eq_mm), 0.07 * r_eq_mm)
    fw, fa, fp = random_plane_waves(rng, 2, (5.0, 9.0), 0.5)  # fine infiltrative ripple
    rw, _, rp = random_plane_waves(rng, 3, (0.8 * r_eq_mm, 1.6 * r_eq_mm), 1.0)
    empty3 = frozen_array(np.zeros((0, 3)))
    # Keyword arguments are evaluated in order: rim width, then signal, septum and oedema draws.
    return LesionSpec(
        centre_mm=frozen_array(np.zeros(3)),
        lobe_centres_mm=frozen_array(centres), lobe_semi_axes_mm=frozen_array(axes), lobe_rotations=frozen_array(rots),
        margin_wavevectors_per_mm=frozen_array(np.vstack([mw, fw])),
        margin_amplitudes_mm=frozen_array(np.concatenate([ma, fa])),
        margin_phases=frozen_array(np.concatenate([mp, fp])),
        texture_centres_mm=empty3, texture_widths_mm=frozen_array(np.zeros(0)), texture_weights=frozen_array(np.zeros(0)),
        texture_amplitude=0.15,
        septa_origins_mm=empty3, septa_normals=empty3, septa_radii_mm=frozen_array(np.zeros(0)),
        septum_thickness_mm=1.0,
        void_starts_mm=empty3, void_ends_mm=empty3, void_radii_mm=frozen_array(np.zeros(0)),
        rim_width_mm=float(rng.uniform(2.5, 4.0)), rim_wavevectors_per_mm=frozen_array(rw), rim_phases=frozen_array(rp),
        rim_threshold=0.0, seed_mm=frozen_array(np.zeros(3)),
        signal_rel=float(rng.uniform(2.6, 3.3) if signal_rel is None else signal_rel),
        septum_rel=float(rng.uniform(1.1, 1.3)), void_rel=0.2,
        oedema_rel=float(rng.uniform(1.45, 1.65) if oedema_rel is None else oedema_rel),
    )


def _scale_to_volume(lesion, volume_ml):
    """The lesion similarity-scaled so that its 1 mm grid count matches ``volume_ml`` (volume ~ k^3).

    Parameters
    ----------
    lesion : LesionSpec
    volume_ml : float
        Target volume, mL.

    Returns
    -------
    LesionSpec
    """
    pts = lesion_grid_points(lesion, 1.0)
    k = (volume_ml / (np.count_nonzero(lesion_function(pts, lesion, np.float32) > 0) / 1000.0)) ** (1 / 3)
    return rescale_lesion_shape(lesion, k)


def _ideal_seed_mm(lesion, pts, f):
    """The lesion's deep point: its centre if deep enough, else the deepest grid point.

    Parameters
    ----------
    lesion : LesionSpec
    pts : (3, N) ndarray
        Local grid points, mm.
    f : (N,) ndarray
        The lesion function at ``pts``, mm.

    Returns
    -------
    (3,) ndarray
        Local mm.
    """
    f0 = float(lesion_function_block(np.zeros((3, 1)), lesion)[0])
    return np.zeros(3) if f0 >= 0.6 * f.max() else pts[:, np.argmax(f)]


def _draw_texture_blobs(rng, inside_mm, n_blobs=30):
    """Nodular heterogeneity: signed Gaussian blobs spread through the lesion.

    Parameters
    ----------
    rng : numpy.random.Generator
    inside_mm : (N, 3) ndarray
        Local grid points inside the lesion, mm.
    n_blobs : int

    Returns
    -------
    centres_mm : (n_blobs, 3) ndarray
    widths_mm : (n_blobs,) ndarray
        Standard deviations, mm.
    weights : (n_blobs,) ndarray
        Signed, dimensionless (see :func:`lesion_texture`).
    """
    centres = inside_mm[rng.integers(len(inside_mm), size=n_blobs)] + rng.uniform(-0.5, 0.5, size=(n_blobs, 3))
    widths = rng.uniform(3.0, 8.0, size=n_blobs)
    weights = rng.choice([-1.0, 1.0], size=n_blobs) * rng.uniform(0.6, 1.2, size=n_blobs)
    return centres, widths, weights


def _draw_septa(rng, deep_mm, seed_mm, r_eq_mm):
    """2-4 dark septa (discs) through deep lesion points, each kept 4 mm clear of the seed.

    A septum whose 50 tries all pass within 4 mm of the seed is dropped, so
    the reader's click lands on lesion signal.

    Parameters
    ----------
    rng : numpy.random.Generator
    deep_mm : (N, 3) ndarray
        Local points well inside the lesion, mm.
    seed_mm : (3,) ndarray
        The ideal seed, local mm.
    r_eq_mm : float
        Radius of the sphere of the target volume, mm (sets the disc radii).

    Returns
    -------
    origins_mm, normals, radii_mm : lists
    """
    origins, normals, radii = [], [], []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(50):
            o = deep_mm[rng.integers(len(deep_mm))]
            nrm = random_unit_vectors(rng)
            rad = r_eq_mm * rng.uniform(0.3, 0.55)
            d = float((seed_mm - o) @ nrm)
            ring = math.sqrt(max(float((seed_mm - o) @ (seed_mm - o)) - d * d, 0.0))
            if abs(d) > 4.0 or ring > rad + 4.0:
                origins.append(o), normals.append(nrm), radii.append(rad)
                break
    return origins, normals, radii


def _draw_flow_voids(rng, deep_mm, seed_mm):
    """2-4 flow-void tubes from deep lesion points, each axis kept 6 mm clear of the seed.

    Parameters
    ----------
    rng : numpy.random.Generator
    deep_mm : (N, 3) ndarray
        Local points well inside the lesion, mm.
    seed_mm : (3,) ndarray
        The ideal seed, local mm.

    Returns
    -------
    starts_mm, ends_mm, radii_mm : lists
        Tube axes (8-20 mm long) and radii (0.8-1.4 mm).
    """
    starts, ends, radii = [], [], []
    for _ in range(int(rng.integers(2, 5))):
        for _attempt in range(50):
            a = deep_mm[rng.integers(len(deep_mm))]
            b = a + random_unit_vectors(rng) * rng.uniform(8.0, 20.0)
            if segment_distance_mm(seed_mm[:, None], a, b)[0] > 6.0:
                starts.append(a), ends.append(b), radii.append(rng.uniform(0.8, 1.4))
                break
    return starts, ends, radii


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
    lobes = _draw_lobes(rng, r_eq, n_lobes, thin_direction)
    draft = _scale_to_volume(_draft_lesion(rng, r_eq, lobes, signal_rel, oedema_rel), volume_ml)
    pts = lesion_grid_points(draft, 1.0)
    f = lesion_function(pts, draft, np.float32)
    seed = _ideal_seed_mm(draft, pts, f)
    blob_centres, blob_widths, blob_weights = _draw_texture_blobs(rng, pts[:, f > 0].T)
    # Septa and flow voids start from points well inside, kept away from the seed.
    deep = pts[:, f > min(4.0, 0.5 * float(f.max()))].T
    origins, normals, radii = _draw_septa(rng, deep, seed, r_eq)
    starts, ends, vradii = _draw_flow_voids(rng, deep, seed)
    return replace(
        draft,
        septa_origins_mm=frozen_array(np.reshape(origins, (-1, 3))), septa_normals=frozen_array(np.reshape(normals, (-1, 3))),
        septa_radii_mm=frozen_array(radii), void_starts_mm=frozen_array(np.reshape(starts, (-1, 3))),
        void_ends_mm=frozen_array(np.reshape(ends, (-1, 3))), void_radii_mm=frozen_array(vradii), seed_mm=frozen_array(seed),
        texture_centres_mm=frozen_array(blob_centres), texture_widths_mm=frozen_array(blob_widths),
        texture_weights=frozen_array(blob_weights),
    )
