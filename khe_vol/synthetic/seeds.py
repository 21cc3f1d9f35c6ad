"""Seeds as a reader places them: a random voxel of bright lesion tissue, not the lesion's deepest point."""

from __future__ import annotations

import numpy as np

from khe_vol.geometry import voxel_to_world
from khe_vol.synthetic.render import render_labels
from khe_vol.synthetic.specs import FLOW_VOID, LESION, SEPTUM


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
