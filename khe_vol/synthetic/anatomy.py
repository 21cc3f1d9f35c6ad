"""One participant's anatomy: trunk, lesion on the flank, a fluid collection and a vessel just clear of it.

:func:`make_anatomy` draws everything from one integer seed; the fluid and
the vessel are moved out from the lesion until they clear it by a chosen gap
(0-0.6 mm and 0.5-2 mm), so partial volume bridges them to the lesion.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import numpy as np

from khe_vol.synthetic.lesion import lesion_bounds_mm, lesion_function, lesion_grid_points, make_lesion, true_lesion_volume_ml
from khe_vol.synthetic.points import fibonacci_sphere, random_plane_waves, random_unit_vectors, rotation_about, unit_vector
from khe_vol.synthetic.specs import Anatomy, frozen_array


def _body_r2(P, semi_axes, taper, wavelength, phase):
    scale = 1 + taper * np.sin(2 * np.pi * P[2] / wavelength + phase)
    return (P[0] / (semi_axes[0] * scale)) ** 2 + (P[1] / (semi_axes[1] * scale)) ** 2


def _surface_distance_mm(Q, lesion, step_mm=0.05):
    """First-order distance from local points Q (3, N) outside the lesion to
    its surface, ``-f / |grad f|`` (central differences), mm; 0 inside.

    The lesion function is only distance-like (it overstates distances
    along a lobe's short axes), so placing neighbours by it alone would put
    them too close.
    """
    Q = Q.astype(np.float32)
    f = lesion_function(Q, lesion)
    grad2 = np.zeros_like(f)
    for j in range(3):
        e = np.zeros((3, 1), dtype=np.float32)
        e[j] = step_mm
        grad2 += ((lesion_function(Q + e, lesion) - lesion_function(Q - e, lesion)) / np.float32(2 * step_mm)) ** 2
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
    outside = np.flatnonzero(lesion_function(moved(offsets), lesion).reshape(len(offsets), -1).max(axis=1) < 0)
    start = offsets[outside[0]] - 1.0 if outside.size else 0.0
    coarse = first_ok(np.arange(max(start, 0.0), max_mm + 0.5, 0.5))
    if coarse is None:
        return float(max_mm), float(_surface_distance_mm(moved(np.array([max_mm])), lesion).min())
    fine = first_ok(np.round(np.arange(max(coarse[0] - 0.5, 0.0), coarse[0] + step_mm / 2, step_mm), 6))
    offset, gap = coarse if fine is None else fine
    return float(offset), float(gap)


class _Trunk(NamedTuple):
    """The trunk's outline and superficial layers (body frame, mm)."""

    semi_axes_mm: np.ndarray
    taper: float
    taper_wavelength_mm: float
    taper_phase: float
    skin_mm: float
    fat_mm: float


def _trunk_r2(P, trunk):
    """Normalised radius squared of body-frame columns P (3, N) in the trunk (< 1 inside)."""
    return _body_r2(P, trunk.semi_axes_mm, trunk.taper, trunk.taper_wavelength_mm, trunk.taper_phase)


def _draw_trunk(rng, body_semi_axes_mm=None):
    """Trunk semi-axes (68-80 x 50-60 mm unless given), taper along z, skin 1.5 mm and fat rim 4-7 mm.

    Parameters
    ----------
    rng : numpy.random.Generator
    body_semi_axes_mm : (2,) float, optional

    Returns
    -------
    _Trunk
    """
    if body_semi_axes_mm is None:
        body_semi_axes_mm = (rng.uniform(68, 80), rng.uniform(50, 60))
    semi = np.asarray(body_semi_axes_mm, dtype=float)
    taper, taper_lambda, taper_phase = rng.uniform(0.02, 0.06), rng.uniform(200, 320), rng.uniform(0, 2 * np.pi)
    skin_mm, fat_mm = 1.5, float(rng.uniform(4.0, 7.0))
    return _Trunk(semi, taper, taper_lambda, taper_phase, skin_mm, fat_mm)


def _place_lesion_on_flank(lesion, direction, trunk):
    """The lesion moved along ``direction`` as close to the skin as it fits inside the body.

    Tries centres from 80 % of the way to the skin inwards in 2 % steps and
    keeps the first whose lesion points stay 0.5 mm under the skin, else the
    best seen (larger follow-ups may bulge, as KHE does).

    Parameters
    ----------
    lesion : LesionSpec
        Centred at the local origin.
    direction : (3,) ndarray
        Unit direction from the body axis, in the x-y plane.
    trunk : _Trunk

    Returns
    -------
    LesionSpec
        With ``centre_mm`` set (body frame, mm).
    """
    semi = trunk.semi_axes_mm
    pts = lesion_grid_points(lesion, 1.5)
    pts = pts[:, lesion_function(pts, lesion, np.float32) > 0]
    to_skin = 1 / np.hypot(direction[0] / semi[0], direction[1] / semi[1])
    limit = (1 - (trunk.skin_mm + 0.5) / semi.min()) ** 2
    best = None
    for frac in np.arange(0.8, -0.001, -0.02):
        centre = direction * to_skin * frac
        worst = _trunk_r2(centre[:, None] + pts, trunk).max()
        if best is None or worst < best[1]:
            best = (centre, worst)
        if worst <= limit:
            best = (centre, worst)
            break
    return replace(lesion, centre_mm=frozen_array(best[0]))


def _place_fluid(rng, lesion, trunk, fluid_gap_mm=None):
    """A fluid ellipsoid deep to the lesion, towards the anterior midline, just clear of it.

    It is moved out along that direction until it clears the lesion by the
    gap (default 0-0.6 mm: touching), and shrunk (up to 5 times by 15 %)
    while it does not fit 2 mm under the fat rim.

    Parameters
    ----------
    rng : numpy.random.Generator
    lesion : LesionSpec
        Placed (``centre_mm`` set).
    trunk : _Trunk
    fluid_gap_mm : float, optional

    Returns
    -------
    centre_mm : (3,) ndarray
    rotation : (3, 3) ndarray
        Columns are the ellipsoid's axes.
    semi_axes_mm : (3,) ndarray
    direction : (3,) ndarray
        Unit direction from the lesion centre to the fluid (the vessel is placed across it).
    gap_mm : float
        Measured smallest distance to the lesion, mm.
    """
    c, semi = lesion.centre_mm, trunk.semi_axes_mm
    fluid_gap = rng.uniform(0.0, 0.6) if fluid_gap_mm is None else float(fluid_gap_mm)
    u2 = rotation_about((0, 0, 1), rng.uniform(-20, 20)) @ unit_vector(np.array([0.0, 0.3 * semi[1], c[2]]) - c)
    u2 = unit_vector(u2 + np.array([0.0, 0.0, rng.uniform(-0.2, 0.2)]))
    fluid_axes = np.array([rng.uniform(10, 14), rng.uniform(9, 12), rng.uniform(12, 18)])
    fluid_rot = rotation_about(random_unit_vectors(rng), rng.uniform(0, 25))
    sphere = fibonacci_sphere(500)
    for _ in range(6):
        surface = fluid_rot @ (sphere * fluid_axes[:, None])
        t, fluid_gap_measured = _first_clear_offset(lesion, c, u2, surface, fluid_gap, 120.0)
        fc = c + t * u2
        inner = (1 - (trunk.fat_mm + 2) / semi.min()) ** 2
        if _trunk_r2(fc[:, None] + surface, trunk).max() < inner:
            break
        fluid_axes = fluid_axes * 0.85  # does not fit inside the body: shrink
    return fc, fluid_rot, fluid_axes, u2, fluid_gap_measured


def _vessel_wall_points(base_mm, along, u1, side, radius_mm, reach_mm):
    """Points on the tube's wall, every ~1 mm along the stretch within ``reach_mm`` of the lesion centre.

    Parameters
    ----------
    base_mm : (5, 3) ndarray
        Vessel axis polyline relative to the lesion side, mm.
    along, u1, side : (3,) ndarray
        The axis' main direction, the direction away from the lesion and the
        third (unit vectors).
    radius_mm, reach_mm : float

    Returns
    -------
    (3, M) ndarray
        Relative to the lesion centre, mm.
    """
    axis_pts = np.concatenate([a + np.linspace(0, 1, int(np.linalg.norm(b - a)) + 1)[:, None] * (b - a)
                               for a, b in zip(base_mm[:-1], base_mm[1:])])
    axis_pts = axis_pts[np.abs(axis_pts @ along) < reach_mm]
    n1 = unit_vector(u1 - (u1 @ along) * along)
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    ring = radius_mm * (np.cos(angles)[:, None] * n1 + np.sin(angles)[:, None] * side)
    return (axis_pts[:, None, :] + ring[None]).reshape(-1, 3).T


def _place_vessel(rng, lesion, fluid_direction, vessel_gap_mm=None):
    """A vessel roughly along the body axis beside the lesion, moved out sideways until its wall clears it.

    Parameters
    ----------
    rng : numpy.random.Generator
    lesion : LesionSpec
        Placed (``centre_mm`` set).
    fluid_direction : (3,) ndarray
        From :func:`_place_fluid`; the vessel lies across it.
    vessel_gap_mm : float, optional
        Wall-to-lesion clearance (default 0.5-2 mm).

    Returns
    -------
    path_mm : (5, 3) ndarray
        Axis polyline, body frame.
    radius_mm : float
        2-3 mm.
    gap_mm : float
        Measured smallest distance of the wall to the lesion, mm.
    """
    c, u2 = lesion.centre_mm, fluid_direction
    vessel_gap = rng.uniform(0.5, 2.0) if vessel_gap_mm is None else float(vessel_gap_mm)
    vessel_r = float(rng.uniform(2.0, 3.0))
    u1 = np.cross([0.0, 0.0, 1.0], u2) * rng.choice([-1.0, 1.0])
    u1 = unit_vector(rotation_about((0, 0, 1), rng.uniform(-25, 25)) @ u1)
    tilt_axis = unit_vector(np.cross([0.0, 0.0, 1.0], random_unit_vectors(rng)))
    along = rotation_about(tilt_axis, rng.uniform(5, 18)) @ np.array([0.0, 0.0, 1.0])
    side = unit_vector(np.cross(along, u1))
    ts = np.array([-160.0, -45.0, 0.0, 45.0, 160.0])
    bend = rng.uniform(-4, 4, size=5) * np.array([1, 1, 0, 1, 1])
    base = ts[:, None] * along + bend[:, None] * side  # (5, 3) relative to the lesion side
    # The wall near the lesion: its box plus the lateral reach of the scan.
    lo, hi = lesion_bounds_mm(lesion)
    reach = float(np.max(np.abs(np.r_[lo, hi]))) + 20.0
    wall = _vessel_wall_points(base, along, u1, side, vessel_r, reach)
    t, vessel_gap_measured = _first_clear_offset(lesion, c, u1, wall, vessel_gap, 150.0)
    return c + t * u1 + base, vessel_r, vessel_gap_measured


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

    The steps draw from one generator in a fixed order (trunk, lesion size
    and side, lesion, fluid, vessel, muscle and bone, signals): the
    phantoms depend on that order.

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
    trunk = _draw_trunk(rng, body_semi_axes_mm)
    semi, fat_mm = trunk.semi_axes_mm, trunk.fat_mm
    volume_ml = rng.uniform(40, 110) if lesion_volume_ml is None else float(lesion_volume_ml)
    if lesion_angle_deg is None:
        lesion_angle_deg = rng.choice([0.0, 180.0]) + rng.uniform(-35, 35)
    direction = np.array([np.cos(np.deg2rad(lesion_angle_deg)), np.sin(np.deg2rad(lesion_angle_deg)), 0.0])
    # The body wall's normal there (gradient of the ellipse), for the lesion's thin axis.
    normal = unit_vector(direction / np.r_[semi**2, 1.0])
    lesion = make_lesion(rng, volume_ml, thin_direction=normal, signal_rel=lesion_signal_rel)
    lesion = _place_lesion_on_flank(lesion, direction, trunk)
    fc, fluid_rot, fluid_axes, u2, fluid_gap_measured = _place_fluid(rng, lesion, trunk, fluid_gap_mm)
    path, vessel_r, vessel_gap_measured = _place_vessel(rng, lesion, u2, vessel_gap_mm)

    muscle_w, muscle_a, muscle_p = random_plane_waves(rng, 4, (15.0, 40.0), 0.05)
    fascia_n = np.array([unit_vector(rng.standard_normal(2)) for _ in range(2)])
    fascia_off = rng.uniform(-0.5, 0.5, size=2) * semi.min()
    bone_r = float(rng.uniform(8.0, 11.0))
    # Keyword arguments are evaluated in order: the signal draws come last.
    return Anatomy(
        rng_seed=int(rng_seed),
        body_semi_axes_mm=frozen_array(semi), body_taper=float(trunk.taper),
        body_taper_wavelength_mm=float(trunk.taper_wavelength_mm),
        body_taper_phase=float(trunk.taper_phase), skin_mm=trunk.skin_mm, fat_mm=fat_mm,
        fascia_normals=frozen_array(fascia_n), fascia_offsets_mm=frozen_array(fascia_off), fascia_thickness_mm=1.5,
        bone_centre_mm=frozen_array([0.0, -semi[1] + fat_mm + bone_r + 6.0]), bone_radius_mm=bone_r, cortex_mm=2.0,
        muscle_wavevectors_per_mm=frozen_array(muscle_w), muscle_amplitudes=frozen_array(muscle_a),
        muscle_phases=frozen_array(muscle_p),
        lesion=lesion,
        vessel_path_mm=frozen_array(path), vessel_radius_mm=vessel_r,
        fluid_centre_mm=frozen_array(fc), fluid_rotation=frozen_array(fluid_rot), fluid_semi_axes_mm=frozen_array(fluid_axes),
        skin_rel=float(rng.uniform(0.9, 1.0)), fat_rel=float(rng.uniform(0.6, 0.8)), cortex_rel=0.08,
        marrow_rel=float(rng.uniform(0.5, 0.6)),
        vessel_rel=float(min(lesion.signal_rel * rng.uniform(1.0, 1.2), 3.9)),
        fluid_rel=float(rng.uniform(4.0, 5.0) if fluid_rel is None else fluid_rel),
        baseline_volume_ml=float(true_lesion_volume_ml(lesion, step_mm=volume_step_mm)),
        vessel_gap_mm=vessel_gap_measured, fluid_gap_mm=fluid_gap_measured,
    )
