"""Draw the README's segmentation figure from a phantom participant.

The figure shows one synthetic participant at baseline and two follow-ups:
the fat-suppressed T2 slice through the lesion, the true lesion outline and
the automatic one (seeded at baseline, tracked from the baseline mask after
that), with true and measured volumes and Dice. Usage, from the repository
root::

    python docs/make_figures.py            # writes docs/figures/segmentation.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from khe_vol.overlap import dice  # noqa: E402
from khe_vol.series import measure_series  # noqa: E402
from khe_vol.synthetic.anatomy import make_anatomy  # noqa: E402
from khe_vol.synthetic.render import render_series  # noqa: E402
from khe_vol.synthetic.specs import SeriesSpec  # noqa: E402

OUT = Path(__file__).resolve().parent / "figures" / "segmentation.png"
SESSIONS = (("ses-baseline", 0, 1.0), ("ses-m06", 6, 0.55), ("ses-m12", 12, 0.14))


def canonical(data, affine):
    """Array reoriented to RAS+ axes, so every panel is shown the same way round, and its voxel sizes (mm)."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, np.float32), affine))
    return np.asarray(img.dataobj), img.header.get_zooms()[:3]


def main():
    anatomy = make_anatomy(2026)
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for n, (ses, month, ratio) in enumerate(SESSIONS):
            spec = SeriesSpec(
                shape=(200, 200, 36), voxel_mm=(0.8, 0.8, 4.0), orientation=("axial_lps", "axial_ras", "axial_lps")[n],
                oblique_deg=8.0 * n, snr=18.0, bias_amplitude=0.4, volume_ratio=ratio, rng_seed=n + 1,
                rotation_deg=(0.0, 0.0, 4.0 * n), translation_mm=(6.0 * n, -4.0 * n, 3.0 * n),
            )
            ph = render_series(anatomy, spec)
            path = Path(tmp) / f"{ses}.nii.gz"
            img = nib.Nifti1Image(ph.image.astype(np.float32), ph.affine)
            img.set_qform(ph.affine, code=1)
            nib.save(img, path)
            record, mask, _ = measure_series("sub-fig", ses, month, path,
                                             seed_ras_mm=ph.seed_ras_mm if n == 0 else None, reference=reference)
            if n == 0:
                reference = {"record": record, "mask": mask}
            panels.append((ses, ph, record, mask))

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (ses, ph, record, mask) in zip(axes, panels):
        image, zooms = canonical(ph.image, ph.affine)
        truth = canonical(ph.truth_mask, ph.affine)[0] > 0.5
        auto = canonical(mask, ph.affine)[0] > 0.5
        # Axial slice (RAS+ axis 2) through the larger of the two lesions,
        # drawn in mm so every acquisition has the right aspect.
        profile = (truth | auto).sum(axis=(0, 1))
        k = int(np.argmax(profile)) if profile.any() else image.shape[2] // 2
        lo, hi = np.percentile(image, [1, 99.5])
        extent = (0, image.shape[0] * zooms[0], 0, image.shape[1] * zooms[1])
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, extent=extent)
        x = (np.arange(image.shape[0]) + 0.5) * zooms[0]
        y = (np.arange(image.shape[1]) + 0.5) * zooms[1]
        if truth[:, :, k].any():
            ax.contour(x, y, truth[:, :, k].T, levels=[0.5], colors="lime", linewidths=1.2, linestyles="--")
        if auto[:, :, k].any():
            ax.contour(x, y, auto[:, :, k].T, levels=[0.5], colors="orangered", linewidths=1.0)
        # Zoom on the lesion, 30 mm around it.
        ii, jj = np.nonzero((truth | auto)[:, :, k])
        if ii.size:
            ax.set_xlim(ii.min() * zooms[0] - 30, (ii.max() + 1) * zooms[0] + 30)
            ax.set_ylim(jj.min() * zooms[1] - 30, (jj.max() + 1) * zooms[1] + 30)
        ax.set_title(
            f"{ses[4:]}: true {ph.true_volume_ml:.1f} mL, measured {record['volume_ml']:.1f} mL\n"
            f"band {record['volume_low_ml']:.1f}-{record['volume_high_ml']:.1f} mL, Dice {dice(mask, ph.truth_mask):.3f}",
            fontsize=9,
        )
        ax.set_axis_off()
    fig.suptitle("Phantom participant: truth (green, dashed) and automatic segmentation (red); "
                 "seeded at baseline, tracked after", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # No timestamps in the PNG, so a rerun gives the same bytes.
    fig.savefig(OUT, dpi=110, metadata={"Software": None})
    print(f"written {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
