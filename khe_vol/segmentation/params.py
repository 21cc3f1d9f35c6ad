"""Segmentation parameters (every tunable, with units) and the error a series job reports."""

from __future__ import annotations

from dataclasses import dataclass


class SegmentationError(ValueError):
    """Segmentation cannot be done; the message says why in coordinator terms."""


#: The automatic path's engines (``SegmentationParams.engine``).
ENGINES = ("classical", "learned", "hybrid")


@dataclass(frozen=True)
class SegmentationParams:
    """Every tunable of :func:`khe_vol.segmentation.seeded.segment_from_seed` and
    :func:`khe_vol.segmentation.track.track_followup`.

    Attributes
    ----------
    max_radius_mm : float
        Half-width of the box searched around the seed, mm. A lesion reaching
        further is cut at the box (``info["touches_roi_border"]``).
    whole_axis_mm : float
        Along an axis where the image is at most this long, mm, the box spans
        the whole image: cropping it would save little, and where the box cuts
        the image would depend on where the seed lies.
    recentre_passes : int
        Elsewhere, the box is re-centred on the lesion found (the centre of its
        bounding box) and the segmentation redone, until the box stays put
        or this many times, so the result does not depend on where in the
        lesion the seed lies (0 = the box stays centred on the seed).
    seed_search_radius_mm : float
        Lesion tissue must lie within this distance of the seed, mm (a seed
        on a flow void, septum or necrosis still works).
    min_contrast : float
        The lesion must be brighter than its surroundings by at least this
        many robust standard deviations of ordinary tissue; otherwise the
        seed is not on hyperintense tissue.
    bias_correction : bool
        Run N4 bias-field correction on the region of interest.
    n4_spacing_mm : float
        Voxel size the region is shrunk to for fitting N4, mm...
    n4_min_samples : int
        ...or smaller, so that every axis keeps at least this many voxels
        (:func:`khe_vol.segmentation.intensity.n4_shrink_factors`).
    n4_iterations : int
        N4 iterations at each fitting level.
    n4_levels : int
        N4 B-spline fitting levels.
    smoothing_sigma_mm : float
        Gaussian smoothing before thresholding, mm.
    lower_fraction : float
        Lower threshold ``B + lower_fraction * (L - B)``.
    fluid_fraction, fluid_sd_factor : float
        Upper threshold ``L + max(fluid_fraction * (L - B), fluid_sd_factor *
        sd)``, ``sd`` the robust standard deviation of the lesion signal:
        above it, tissue may be fluid (a heterogeneous lesion keeps its
        bright parts below it)...
    fluid_max_sd, fluid_height_sd : float
        ...and it is fluid when it is a plateau: standard deviation inside
        it at most ``fluid_max_sd * (L - B)`` (bright oedema, necrosis or
        haemorrhage belonging to a lesion is not flat), and mean at least
        ``fluid_height_sd`` of those standard deviations above the threshold
        (a patch of smooth lesion heterogeneity crossing it is not)...
    enclosure_fraction : float
        ...and not surrounded by the lesion: a flat bright region at least
        this fraction of whose bordering voxels are lesion is a bright core
        and kept...
    nodule_border_fraction : float
        ...and not a bright nodule of the lesion: a flat bright region at
        least this fraction of whose bordering voxels are at or above the
        lower threshold is lesion (:func:`fluid_mask`); above 1 turns this off.
    converged_fraction : float
        The re-estimation stops early once the thresholds move by at most
        this fraction of the contrast ``L - B`` (on the throughput cohort
        they settle within 0.1 % after one pass).
    threshold_iterations : int
        Re-estimations of ``L`` and ``sd`` from the segmentation.
    shell_inner_mm, shell_outer_mm : float
        ``sd`` is measured at least ``shell_inner_mm`` inside the lesion (away
        from partial volume); ``shell_outer_mm`` is part of the margin of the
        box later passes run on, mm.
    closing_radius_mm : float
        Closing radius bridging thin dark septa inside the lesion, mm.
    opening_radius_mm : float
        Opening radius cutting bridges to vessels, mm: parts thinner than
        twice this are cut off the lesion.
    septum_gap_mm : float
        Parts of the lesion left after the opening that lie within this
        distance of the seed's part are joined to it (lobes walled off by a
        septum), mm.
    band_fraction_delta : float
        For the volume's uncertainty band, the segmentation is redone with
        ``lower_fraction`` moved by this much either way (a stricter and a
        looser edge; see :func:`threshold_band_ml`).
    restore_radius_mm, restore_max_mm : float
        A part removed by the opening is put back whole when it lies within
        ``restore_max_mm`` of what survived (a small lobe, a protrusion);
        otherwise (a vessel, a bridge) only within ``restore_radius_mm`` of
        it, below the vessel gap, so a cut-off vessel stays cut off.
    fill_holes_slicewise : bool
        Also fill holes in each slice (flow voids running through slices).
    track_margin_mm : float
        Follow-ups: the lesion is searched for within this distance of the
        registered reference lesion, mm.
    track_erosion_mm : float
        Follow-ups: the reference lesion is eroded by this much before it
        seeds the search, mm, so a registration error does not start the
        search on neighbouring tissue.
    min_lesion_ml : float
        Follow-ups: residual lesion smaller than this is taken as noise, mL.
    registration_spacing_mm : float
        Follow-ups: finest voxel size used by the rigid registration, mm.
    core_reach_mm, core_enclosure_fraction : float
        A seed left outside the lesion (on a necrotic or cystic core that
        opens to the outside, so hole filling misses it): the voxels around
        it that the lesion surrounds within ``core_reach_mm`` (mm) in at
        least this fraction of 26 directions are lesion
        (:func:`enclosed_core`); ``core_reach_mm`` 0 turns this off.
    low_band_fraction, low_band_min_thickness_mm : float
        Thick low band (:func:`thick_low_band`): tissue above
        ``B + low_band_fraction * (L - B)`` touching the lesion is added
        where it survives an opening of ``low_band_min_thickness_mm`` (mm)
        on its own, so extensive dimmer tissue joins the lesion and a thin
        oedema rim does not. Either 0 turns this off (the default: on the
        benchmark it barely helped, see the function).
    click_sample_radius_mm, click_level_tolerance, click_min_contrast_fraction : float
        A reader's include click on tissue darker than the lesion threshold
        (:func:`khe_vol.segmentation.interactive.grow_from_click`): the
        connected tissue within ``click_level_tolerance`` robust standard
        deviations (measured within ``click_sample_radius_mm`` of the click)
        of the click's level, and at least ``click_min_contrast_fraction`` of
        the lesion contrast, joins the lesion.
    click_reach_mm : float
        An include click on tissue dimmer than the lesion threshold adds the
        tissue at least as bright as the click within this distance beyond
        the lesion edge nearest it, mm; an exclude click on lesion-bright
        tissue partitions the mask within it. (An exclude on dimmer tissue
        removes it wherever it is connected: no reach.)
    click_compactness : float
        Where a click partitions the mask along intensity edges (an exclude
        on lesion-bright tissue, a barrier), each voxel of distance from a
        marker costs this many median gradients, so flat tissue is shared by
        distance rather than by its noise (compact watershed).
    engine : {"classical", "learned", "hybrid"}
        The automatic path (:func:`khe_vol.segmentation.learned.engine_mask`):
        the classical engine alone; ``learned``, LiteMedSAM prompted with the
        classical mask's 3D box (widened by ``learned_pad_mm``) and carried
        slice to slice; ``hybrid``, LiteMedSAM prompted on every slice of the
        classical mask with its box there (widened by ``learned_pad_mm``).
    learned_pad_mm : float
        How far the learned engine's boxes reach beyond the classical mask, mm.
    engines_disagree_fraction : float
        With ``learned`` or ``hybrid``, a series whose two engines' volumes
        differ by more than this share of the classical one is flagged
        ``engines_disagree``.
    """

    max_radius_mm: float = 90.0
    whole_axis_mm: float = 270.0
    recentre_passes: int = 2
    seed_search_radius_mm: float = 10.0
    min_contrast: float = 2.0
    bias_correction: bool = True
    n4_spacing_mm: float = 8.0
    n4_min_samples: int = 24
    n4_iterations: int = 10
    n4_levels: int = 3
    smoothing_sigma_mm: float = 0.5
    lower_fraction: float = 0.5
    fluid_fraction: float = 0.25
    fluid_sd_factor: float = 2.0
    fluid_max_sd: float = 0.08
    fluid_height_sd: float = 3.0
    enclosure_fraction: float = 0.6
    nodule_border_fraction: float = 0.8
    threshold_iterations: int = 3
    converged_fraction: float = 0.005
    shell_inner_mm: float = 1.5
    shell_outer_mm: float = 6.0
    closing_radius_mm: float = 1.5
    opening_radius_mm: float = 4.0
    septum_gap_mm: float = 3.0
    restore_radius_mm: float = 1.5
    restore_max_mm: float = 6.0
    band_fraction_delta: float = 0.1
    fill_holes_slicewise: bool = True
    edge_sigma_mm: float = 0.7
    track_margin_mm: float = 15.0
    track_erosion_mm: float = 2.0
    min_lesion_ml: float = 0.1
    registration_spacing_mm: float = 2.0
    core_reach_mm: float = 20.0
    core_enclosure_fraction: float = 0.4
    low_band_fraction: float = 0.0
    low_band_min_thickness_mm: float = 0.0
    click_reach_mm: float = 10.0
    click_compactness: float = 0.1
    click_sample_radius_mm: float = 3.0
    click_level_tolerance: float = 1.0
    click_min_contrast_fraction: float = 0.05
    engine: str = "classical"
    learned_pad_mm: float = 3.0
    engines_disagree_fraction: float = 0.2

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise SegmentationError(f"segmentation engine is one of {', '.join(ENGINES)}, not {self.engine!r}")
