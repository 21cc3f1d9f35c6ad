"""Tissue labelling of the continuous anatomy: which tissue is at a body-frame point, and its nominal signal.

A higher label code wins where structures overlap (from ``CORTEX`` on), so the
lesion overrides vessel, fluid and bone. With a sub-sample reach,
:func:`classify_points` also says which points may lie near a boundary (the
voxels the renderer must sub-sample).
"""

from __future__ import annotations

import numpy as np

from khe_vol.synthetic.lesion import lesion_bounds_mm, lesion_function, lesion_lipschitz
from khe_vol.synthetic.points import as_columns, cosine_field, dot_columns, segment_distance_mm
from khe_vol.synthetic.specs import (
    CORTEX,
    FAT,
    FLOW_VOID,
    FLUID,
    LESION,
    MARROW,
    MUSCLE,
    MUSCLE_SIGNAL,
    OEDEMA,
    SEPTUM,
    SKIN,
    TISSUES,
    VESSEL,
)


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


def _label_trunk(P, anatomy, reach_xy_mm, reach_3d_mm, mixed):
    """Trunk labels: muscle, with fat then skin at decreasing depth, fat planes and the bone.

    Parameters
    ----------
    P : (3, N) float ndarray
        Body-frame points, mm.
    anatomy : Anatomy
    reach_xy_mm, reach_3d_mm : float
        Sub-sample reach in the x-y plane and in 3D, mm (0 without a check).
    mixed : (N,) bool ndarray or None
        Set in place where a trunk boundary may pass within the reach.

    Returns
    -------
    labels : (N,) int8 ndarray
    inside : (N,) bool ndarray
        Inside the body's outline.
    """
    t_ = P.dtype.type
    n = P.shape[1]
    check = mixed is not None
    r_xy, r_3d = reach_xy_mm, reach_3d_mm
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
    return lab, inside


def _add_fluid(P, anatomy, labels, mixed, reach_3d_mm):
    """Label the fluid collection (an ellipsoid) into ``labels`` in place.

    Parameters
    ----------
    P : (3, N) float ndarray
        Body-frame points, mm.
    anatomy : Anatomy
    labels : (N,) int8 ndarray
        Raised to ``FLUID`` inside the ellipsoid.
    mixed : (N,) bool ndarray or None
        Set in place where the fluid's surface may pass within the reach.
    reach_3d_mm : float
    """
    r_3d = reach_3d_mm
    rel = P - anatomy.fluid_centre_mm.astype(P.dtype)[:, None]
    big = anatomy.fluid_semi_axes_mm.max() + r_3d
    idx = np.flatnonzero((rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) < big * big)
    if idx.size:
        m = anatomy.fluid_rotation / anatomy.fluid_semi_axes_mm
        R = rel[:, idx]
        q = np.sqrt(sum(dot_columns(R, m[:, j]) ** 2 for j in range(3)))
        labels[idx] = np.maximum(labels[idx], (q < 1).astype(np.int8) * np.int8(FLUID))
        if mixed is not None:
            mixed[idx] |= np.abs(q - 1) < r_3d / anatomy.fluid_semi_axes_mm.min()


def _add_vessel(P, anatomy, labels, inside, mixed, reach_3d_mm):
    """Label the vessel (a tube around a polyline, inside the body only) into ``labels`` in place.

    Parameters
    ----------
    P : (3, N) float ndarray
        Body-frame points, mm.
    anatomy : Anatomy
    labels : (N,) int8 ndarray
    inside : (N,) bool ndarray
        Inside the body's outline.
    mixed : (N,) bool ndarray or None
        Set in place where the vessel wall may pass within the reach.
    reach_3d_mm : float
    """
    t_ = P.dtype.type
    r_3d = reach_3d_mm
    path, r_v = anatomy.vessel_path_mm, anatomy.vessel_radius_mm
    lo, hi = path.min(axis=0) - r_v - r_3d, path.max(axis=0) + r_v + r_3d
    box = inside.copy() if mixed is None else np.ones(P.shape[1], dtype=bool)
    for j in range(3):
        box &= (P[j] >= t_(lo[j])) & (P[j] <= t_(hi[j]))
    idx = np.flatnonzero(box)
    if idx.size:
        S = P[:, idx]
        dist = np.min([segment_distance_mm(S, a, b) for a, b in zip(path[:-1], path[1:])], axis=0)
        labels[idx] = np.maximum(labels[idx], (inside[idx] & (dist < r_v)).astype(np.int8) * np.int8(VESSEL))
        if mixed is not None:
            mixed[idx] |= np.abs(dist - r_v) < r_3d


def _points_near_lesion(P, lesion, lesion_scale, margin_mm):
    """Points that may lie within ``margin_mm`` (local, unscaled) of the scaled lesion.

    Returns
    -------
    idx : (M,) int ndarray
        Their indices in P.
    Q : (3, M) ndarray
        Their local coordinates at scale 1, mm, in P's dtype.
    """
    t_ = P.dtype.type
    lo, hi = lesion_bounds_mm(lesion, margin_mm=margin_mm)
    Q = (P - lesion.centre_mm.astype(P.dtype)[:, None]) / t_(lesion_scale)
    box = np.ones(P.shape[1], dtype=bool)
    for j in range(3):
        box &= (Q[j] >= t_(lo[j])) & (Q[j] <= t_(hi[j]))
    idx = np.flatnonzero(box)
    return idx, np.ascontiguousarray(Q[:, idx])


def _add_septa(Q, lesion, lesion_scale, in_lesion, labels, near_lesion, mixed, reach_3d_mm):
    """Raise lesion points on a septum (a disc of physical thickness) to ``SEPTUM``, in place.

    Parameters
    ----------
    Q : (3, M) ndarray
        Local points at scale 1, mm.
    lesion : LesionSpec
    lesion_scale : float
    in_lesion : (M,) bool ndarray
    labels : (M,) int8 ndarray
    near_lesion, mixed : (M,) bool ndarray or None
        With a check: points near the lesion, and the mixed flags set in place.
    reach_3d_mm : float
    """
    t_ = Q.dtype.type
    s, r_3d = lesion_scale, reach_3d_mm
    for o, nrm, rad in zip(lesion.septa_origins_mm, lesion.septa_normals, lesion.septa_radii_mm):
        R = Q - o.astype(Q.dtype)[:, None]
        d = np.abs(dot_columns(R, nrm)) * t_(s)  # physical distance to the disc's plane
        ring = np.sqrt(np.maximum(R[0] ** 2 + R[1] ** 2 + R[2] ** 2 - (d / t_(s)) ** 2, 0)) * t_(s)
        hit = in_lesion & (d < lesion.septum_thickness_mm / 2) & (ring < rad * s)
        np.maximum(labels, hit.astype(np.int8) * np.int8(SEPTUM), out=labels)
        if mixed is not None:
            mixed |= near_lesion & (d < lesion.septum_thickness_mm / 2 + r_3d) & (ring < rad * s + r_3d)


def _add_flow_voids(Q, lesion, lesion_scale, in_lesion, labels, near_lesion, mixed, reach_3d_mm):
    """Raise lesion points in a flow-void tube (physical radius) to ``FLOW_VOID``, in place.

    Parameters as :func:`_add_septa`.
    """
    t_ = Q.dtype.type
    s, r_3d = lesion_scale, reach_3d_mm
    for a, b, rad in zip(lesion.void_starts_mm, lesion.void_ends_mm, lesion.void_radii_mm):
        dv = segment_distance_mm(Q, a, b) * t_(s)
        np.maximum(labels, (in_lesion & (dv < rad)).astype(np.int8) * np.int8(FLOW_VOID), out=labels)
        if mixed is not None:
            mixed |= near_lesion & (np.abs(dv - rad) < r_3d)


def _add_lesion(P, anatomy, lesion_scale, labels, inside, mixed, reach_3d_mm):
    """Label the lesion, its septa and flow voids, and the oedema rim around it, in place.

    Parameters
    ----------
    P : (3, N) float ndarray
        Body-frame points, mm.
    anatomy : Anatomy
    lesion_scale : float
        Isotropic lesion scale about its centre; nothing is labelled at 0.
    labels : (N,) int8 ndarray
    inside : (N,) bool ndarray
        Inside the body's outline (the oedema rim stays inside).
    mixed : (N,) bool ndarray or None
        Set in place where a lesion, rim, septum or void boundary may pass within the reach.
    reach_3d_mm : float
    """
    t_ = P.dtype.type
    s, r_3d = float(lesion_scale), reach_3d_mm
    if not s > 0:
        return
    les = anatomy.lesion
    lip = lesion_lipschitz(les)
    w = les.rim_width_mm
    idx, Q = _points_near_lesion(P, les, s, (w + lip * r_3d) / s)
    if not idx.size:
        return
    f = lesion_function(Q, les) * t_(s)  # physical mm
    cover = cosine_field(Q, les.rim_wavevectors_per_mm, np.ones(len(les.rim_phases)), les.rim_phases)
    inl = f > 0
    rim = inside[idx] & ~inl & (f > -w) & (cover > les.rim_threshold)
    sub = np.maximum(labels[idx], rim.astype(np.int8) * np.int8(OEDEMA))
    np.maximum(sub, inl.astype(np.int8) * np.int8(LESION), out=sub)
    near_les = m = None
    if mixed is not None:
        band = lip * r_3d
        cover_lip = float(np.abs(np.linalg.norm(les.rim_wavevectors_per_mm, axis=1)).sum()) / s
        near_les = f > -band
        m = (np.abs(f) < band) | (np.abs(f + w) < band)
        m |= (np.abs(cover - les.rim_threshold) < cover_lip * r_3d) & (f > -w - band) & (f < band)
    _add_septa(Q, les, s, inl, sub, near_les, m, r_3d)
    _add_flow_voids(Q, les, s, inl, sub, near_les, m, r_3d)
    labels[idx] = sub
    if mixed is not None:
        mixed[idx] |= m


def classify_points(P, anatomy, lesion_scale, reach=None):
    """Tissue labels of body-frame columns P (3, N), and which may be mixed.

    Structures are laid down in order (trunk and bone, fluid, vessel, lesion
    with rim, septa and voids); a higher code wins where they overlap.

    Parameters
    ----------
    P : (3, N) float ndarray
        Body-frame points, mm.
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
    check = reach is not None
    r_xy, r_3d = reach if check else (0.0, 0.0)
    mixed = np.zeros(P.shape[1], dtype=bool) if check else None
    lab, inside = _label_trunk(P, anatomy, r_xy, r_3d, mixed)
    _add_fluid(P, anatomy, lab, mixed, r_3d)
    _add_vessel(P, anatomy, lab, inside, mixed, r_3d)
    _add_lesion(P, anatomy, lesion_scale, lab, inside, mixed, r_3d)
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
    return classify_points(as_columns(points_body_mm), anatomy, lesion_scale)[0]


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
