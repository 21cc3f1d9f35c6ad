"""Synthetic fat-suppressed T2 series of KHE lesions, with exact volume truth (demo, tests, benchmarks).

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

Modules, in the order a phantom is made:

- :mod:`~khe_vol.synthetic.specs`: tissue codes and the dataclasses (``LesionSpec``,
  ``Anatomy``, ``SeriesSpec``, ``Phantom``);
- :mod:`~khe_vol.synthetic.points`: point sets ``(3, N)``, rotations, random directions and plane waves;
- :mod:`~khe_vol.synthetic.lesion`: the lesion's shape function, texture, exact volume, truth mask, ``make_lesion``;
- :mod:`~khe_vol.synthetic.tissue`: tissue label of any body-frame point (``tissue_labels``) and its signal;
- :mod:`~khe_vol.synthetic.anatomy`: ``make_anatomy``, one participant;
- :mod:`~khe_vol.synthetic.render`: a session's pose and grid, ``render_series`` (image and truth),
  ``render_labels`` (the tissue of every voxel, to check where a segmentation went);
- :mod:`~khe_vol.synthetic.seeds`: seeds as a reader places them;
- :mod:`~khe_vol.synthetic.demo`: the demo study on disk (``write_demo_cohort``) and ``nifti_gz_bytes``.
- :mod:`~khe_vol.synthetic.dicom`: phantom series as a scanner's DICOM (single-frame or enhanced
  multi-frame, with identifiers and deliberate faults) and the DICOM demo (``write_dicom_demo``).

Everything is a pure function of its arguments; randomness comes only from
``numpy.random.default_rng`` seeded with integers the caller passes.
Internally, point sets are stored coordinate-first, shape ``(3, N)``, because
NumPy is far faster on contiguous coordinate rows than on ``(N, 3) @ (3, 3)``.
"""
