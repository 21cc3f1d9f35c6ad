"""A series of a participant: its pose and grid, and rendering with partial volume, bias field and Rician noise.

A session places the body in scanner RAS+ space with a rigid transform
(repositioning) and, for follow-ups, scales the lesion about its centre by
``ratio ** (1/3)``, so the follow-up volume is exactly ``ratio`` times the
baseline volume. A series is rendered by mapping sub-samples of every voxel
(2 x 2 in plane, at least 3 through the slice) into the body frame and
averaging, then applying a smooth bias field and Rician noise.
"""

from __future__ import annotations

import numpy as np

from khe_vol.geometry import voxel_to_world
from khe_vol.synthetic.lesion import lesion_bounds_mm, lesion_function, lesion_grid_points, lesion_mask_on_grid, lesion_texture
from khe_vol.synthetic.points import affine_columns, as_columns, cosine_field, dot_columns, euler_rotation, random_unit_vectors, rotation_about
from khe_vol.synthetic.specs import LESION, MUSCLE, MUSCLE_SIGNAL, ORIENTATIONS, Phantom
from khe_vol.synthetic.tissue import classify_points, tissue_signal


_RENDER_CHUNK = 1_000_000  # sub-samples per block when rendering


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
    P = as_columns(points_ras_mm).astype(np.float64)
    centre = P.mean(axis=1)
    P = (P - centre[:, None]).astype(np.float32)  # float32: a smooth field needs no more
    t = np.zeros(P.shape[1], dtype=np.float32)
    for _ in range(3):
        mu = (rng.uniform(-80, 80, size=3)).astype(np.float32)
        sigma = rng.uniform(70, 140)
        d2 = (P[0] - mu[0]) ** 2 + (P[1] - mu[1]) ** 2 + (P[2] - mu[2]) ** 2
        t += np.float32(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)) * np.exp(d2 * np.float32(-0.5 / sigma**2))
    t += dot_columns(P, random_unit_vectors(rng) * rng.uniform(0.002, 0.006))
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
    P = affine_columns(m, np.indices(spec.shape).reshape(3, -1))
    return classify_points(P, anatomy, spec.volume_ratio ** (1 / 3))[0].reshape(spec.shape)


def _label_voxels(centres_body_mm, anatomy, lesion_scale, reach):
    """Tissue at every voxel centre, and which voxels a boundary may cross (in blocks).

    Parameters
    ----------
    centres_body_mm : (3, N) float32 ndarray
        Voxel centres in the body frame, mm.
    anatomy : Anatomy
    lesion_scale : float
    reach : (float, float)
        Sub-sample reach in the body's x-y plane and in 3D, mm.

    Returns
    -------
    labels : (N,) int8 ndarray
    mixed : (N,) bool ndarray
    """
    lab = np.empty(centres_body_mm.shape[1], dtype=np.int8)
    mixed = np.empty(centres_body_mm.shape[1], dtype=bool)
    for start in range(0, lab.size, _RENDER_CHUNK):
        block = slice(start, start + _RENDER_CHUNK)
        lab[block], mixed[block] = classify_points(centres_body_mm[:, block], anatomy, lesion_scale, reach)
    return lab, mixed


def _partial_volume(centres_body_mm, offsets_mm, anatomy, lesion_scale, labels, mixed, flat_lut):
    """Flat signal and lesion and muscle fractions per voxel, sub-sampling the mixed voxels.

    Parameters
    ----------
    centres_body_mm : (3, N) float32 ndarray
    offsets_mm : (3, n_sub) float32 ndarray
        Sub-sample offsets from a voxel centre, body frame, mm.
    anatomy : Anatomy
    lesion_scale : float
    labels, mixed : (N,) ndarray
        From :func:`_label_voxels`.
    flat_lut : (len(TISSUES),) float32 ndarray
        Signal of the untextured tissues (0 for lesion and muscle).

    Returns
    -------
    flat : (N,) float32 ndarray
        Mean untextured signal, image units.
    frac_lesion, frac_muscle : (N,) float32 ndarray
        Fractions of the voxel's sub-samples in lesion and in muscle.
    """
    n_sub = offsets_mm.shape[1]
    flat = flat_lut[labels]
    frac_lesion = (labels == LESION).astype(np.float32)
    frac_muscle = (labels == MUSCLE).astype(np.float32)
    todo = np.flatnonzero(mixed)
    step = max(1, _RENDER_CHUNK // n_sub)
    for start in range(0, todo.size, step):
        idx = todo[start:start + step]
        P = (centres_body_mm[:, idx, None] + offsets_mm[:, None, :]).reshape(3, -1)
        sub = classify_points(P, anatomy, lesion_scale)[0].reshape(idx.size, n_sub)
        flat[idx] = flat_lut[sub].mean(axis=1)
        frac_lesion[idx] = np.count_nonzero(sub == LESION, axis=1) / n_sub
        frac_muscle[idx] = np.count_nonzero(sub == MUSCLE, axis=1) / n_sub
    return flat, frac_lesion, frac_muscle


def _textured_image(centres_body_mm, anatomy, lesion_scale, flat, frac_lesion, frac_muscle, signal):
    """Noise-free image before bias: flat signal plus textured muscle and lesion (float64, image units).

    Parameters
    ----------
    centres_body_mm : (3, N) float32 ndarray
    anatomy : Anatomy
    lesion_scale : float
    flat, frac_lesion, frac_muscle : (N,) ndarray
        From :func:`_partial_volume`.
    signal : (len(TISSUES),) float32 ndarray
        Nominal signal per tissue (:func:`tissue_signal`).

    Returns
    -------
    (N,) float64 ndarray
    """
    s, lesion = lesion_scale, anatomy.lesion
    image = flat.astype(np.float64)
    sel = np.flatnonzero(frac_muscle)
    texture = cosine_field(centres_body_mm[:, sel], anatomy.muscle_wavevectors_per_mm, anatomy.muscle_amplitudes,
                           anatomy.muscle_phases)
    image[sel] += frac_muscle[sel] * signal[MUSCLE] * (1 + texture)
    sel = np.flatnonzero(frac_lesion)
    if sel.size:
        local = (centres_body_mm[:, sel] - lesion.centre_mm.astype(np.float32)[:, None]) / np.float32(s)
        texture = lesion_texture(local, lesion)
        image[sel] += frac_lesion[sel] * signal[LESION] * (1 + texture)
    return image


def _bias_and_noise(image, world_ras_mm, series_spec):
    """The image times the bias field, with Rician noise (the magnitude of signal plus complex Gaussian noise).

    Both draw from ``default_rng(series_spec.rng_seed)``, bias first.

    Parameters
    ----------
    image : (N,) float64 ndarray
        Modified in place (the bias).
    world_ras_mm : (3, N) ndarray
        Voxel centres in scanner RAS+ mm.
    series_spec : SeriesSpec

    Returns
    -------
    (N,) float32 ndarray
    """
    rng = np.random.default_rng(series_spec.rng_seed)
    image *= bias_field(world_ras_mm.T, rng, series_spec.bias_amplitude)
    sigma = MUSCLE_SIGNAL / series_spec.snr
    real = image + rng.normal(0.0, sigma, image.size)
    imag = rng.normal(0.0, sigma, image.size)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


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
    reach = (float(np.max(np.hypot(offsets[0], offsets[1]))), float(np.max(np.linalg.norm(offsets, axis=0))))
    ijk = np.indices(shape).reshape(3, -1)
    centres = affine_columns(m, ijk, np.float32)

    signal = tissue_signal(anatomy).astype(np.float32)
    # Lesion and muscle get a smooth per-voxel modulation; the rest is flat.
    flat_lut = signal.copy()
    flat_lut[[LESION, MUSCLE]] = 0
    lab, mixed = _label_voxels(centres, anatomy, s, reach)
    flat, frac_lesion, frac_muscle = _partial_volume(centres, offsets, anatomy, s, lab, mixed, flat_lut)
    image = _textured_image(centres, anatomy, s, flat, frac_lesion, frac_muscle, signal)
    image = _bias_and_noise(image, affine_columns(affine, ijk), spec).reshape(shape)

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
    pts = lesion_grid_points(anatomy.lesion, 1.0)
    pts = pts[:, lesion_function(pts, anatomy.lesion, np.float32) > 0]
    m = np.linalg.inv(series_affine(anatomy, series_spec)) @ body_to_world(series_spec)
    ijk = affine_columns(m, pts * s + anatomy.lesion.centre_mm[:, None])
    hi = np.asarray(series_spec.shape, dtype=float)[:, None] - 1 - margin_voxels
    return bool(np.all(ijk >= margin_voxels) and np.all(ijk <= hi))
