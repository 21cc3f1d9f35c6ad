"""Specifications of the synthetic study: tissue codes, lesion, anatomy, series and a rendered phantom.

Plain frozen dataclasses and constants; the functions that make and render
them live in :mod:`khe_vol.synthetic.lesion`, :mod:`~khe_vol.synthetic.anatomy`
and :mod:`~khe_vol.synthetic.render`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def frozen_array(a, dtype=float):
    arr = np.array(a, dtype=dtype)
    arr.setflags(write=False)
    return arr


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
