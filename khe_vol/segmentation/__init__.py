"""Seeded segmentation of a T2-hyperintense lesion (KHE) on its native grid.

Method (every distance in mm, so anisotropic, oblique and flipped grids
behave alike)
-----------------------------------------------------------------------
1. **Region of interest.** A box of half-width ``max_radius_mm`` around the
   seed, spanning the whole image along axes at most ``whole_axis_mm`` long;
   everything below runs on it only. Where the image is larger, the box is
   re-centred on the lesion found and steps 2-5 redone
   (``recentre_passes``). Either way, where the box cuts the image, and with
   it the bias field and the tissue level, does not depend on where in the
   lesion the reader clicked.
2. **Bias field.** N4 (SimpleITK) fitted on a copy shrunk to about
   ``n4_spacing_mm`` voxels (finer on a small field of view, so every axis
   keeps ``n4_min_samples``), one voxel per block picked by index, so the
   same voxels whatever the header says below a voxel; its field applied
   at full resolution; then a light Gaussian of ``smoothing_sigma_mm``.
   Data with negative values are already normalised (e.g. z-scores) and
   are left alone.
3. **Intensity model.** ``L`` is the lesion level (median of the current
   lesion), ``B`` the level of the ordinary tissue it displaces (the mode of
   the region's histogram above its dark class), ``c = L - B`` the
   contrast. Lesion tissue is
   ``I >= B + lower_fraction * c``: half-way between lesion and
   surroundings is the unbiased edge for partial-volume voxels, and sits
   above an oedema rim. Flat regions (``fluid_max_sd``, about a linear
   trend: bias correction leaves a few percent across a collection) above
   ``L + max(fluid_fraction * c, fluid_sd_factor * sd)`` are fluid: fluid
   beside the lesion is excluded with its partial-volume rim, while a
   bright core the lesion surrounds (``enclosure_fraction``) is kept, as is
   bright heterogeneous tissue and a flat bright nodule bordered almost all
   round by lesion-level tissue (``nodule_border_fraction``). ``L`` and ``sd`` are re-estimated
   from the segmentation ``threshold_iterations`` times (an isodata-like
   local threshold).
4. **Shape.** A closing of ``closing_radius_mm`` bridges thin dark septa, an
   opening of ``opening_radius_mm`` cuts bridges to touching vessels, the
   component at the seed is kept and what the opening took from it restored
   (``restore_radius_mm``, ``restore_max_mm``); parts walled off by a
   thick septum within ``septum_gap_mm`` join it; holes (flow voids, septa,
   necrosis) are filled in 3D and slice by slice; a core at the seed that
   the lesion surrounds in most directions but does not close (necrosis
   open to the outside) is taken in too (``core_enclosure_fraction``).
5. **Edges.** A marker watershed of the gradient magnitude
   (``edge_sigma_mm``) moves the boundary by up to one voxel onto the
   steepest edge, along the finely sampled axes only.

The same band segmentation, started from a registered reference lesion
instead of a seed, finds the lesion again in follow-ups
(:mod:`khe_vol.segmentation.track`).


Modules, in the order data flows through a series job
-------------------------------------------------------
- :mod:`~khe_vol.segmentation.params`: :class:`SegmentationParams`, :class:`SegmentationError`.
- :mod:`~khe_vol.segmentation.morphology`: boxes, balls, mm morphology, holes, components
  (a radius read with ``RADIUS_RTOL`` of slack, so grids a header's rounding apart give the
  same balls, boxes and slice axis).
- :mod:`~khe_vol.segmentation.labels`: per-label sums / extrema / selection (fast scipy equivalents).
- :mod:`~khe_vol.segmentation.intensity`: bias correction, smoothing, tissue level, intensity model.
- :mod:`~khe_vol.segmentation.band`: band segmentation, fluid plateaus, enclosed core, iteration, threshold band.
- :mod:`~khe_vol.segmentation.edges`: edge refinement (step 5).
- :mod:`~khe_vol.segmentation.seeded`: :func:`segment_from_seed`, the baseline entry point (step 1).
- :mod:`~khe_vol.segmentation.interactive`: a reader's include / exclude clicks steer a mask
  (:func:`segment_clicks`, :class:`ClickSession`); one include click is :func:`segment_from_seed`.
- :mod:`~khe_vol.segmentation.track`: registration, intensity map, :func:`track_followup`.
- :mod:`~khe_vol.segmentation.learned`: the learned engine (LiteMedSAM box prompts on ONNX
  Runtime): a reader's 3D box (:func:`segment_box`), or the classical mask's boxes for
  ``segmentation.engine: learned | hybrid`` (:func:`engine_mask`).
- :mod:`~khe_vol.segmentation.uncertainty`: volume band and near-threshold flags.

The package itself imports nothing (so ``import khe_vol.segmentation.params``
does not load SimpleITK); import from the modules.
"""
