"""Mask editing in the reader app (edit.js), in a real Chromium on a real served package.

Brush and eraser sizes, the 3D sphere brush on an anisotropic oblique grid, fill between
slices, undo/redo, the live edited volume against the volume the server computes, and the
saved mask's grid. Every expected voxel set is computed here from the case image's affine
(nibabel), independently of the viewer's own geometry.
"""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from khe_vol.cli import main
from khe_vol.geometry import voxel_volume_mm3
from khe_vol.files import atomic_write_bytes, sha256_file
from khe_vol.nifti import mask_image, write_nifti
from khe_vol.qa import store
from khe_vol.qa.app import find_niivue
from khe_vol.qa.key import read_key
from tests.conftest import make_affine
from tests.qa_cohort import write_t2
from tests.test_qa_app import reader_browser, wait_status, world_to_voxel

pytestmark = pytest.mark.slow  # a real browser

SHAPE = (48, 44, 12)
LESION_CENTRE_MM = np.array([0.0, 0.0, 0.0])


def _tilt_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


#: 1 x 1 x 4 mm voxels, tilted 12 degrees about x (an oblique acquisition): a sphere in mm is
#: neither a cube nor a ball of voxel indices here.
OBLIQUE_1x1x4 = make_affine((1.0, 1.0, 4.0), (0, 0, 0), rot=_tilt_x(12.0))
OBLIQUE_1x1x4[:3, 3] = -OBLIQUE_1x1x4[:3, :3] @ (np.array(SHAPE) - 1) / 2
#: Array axes swapped and flipped against RAS (i -> -y, j -> -x), 0.9 x 0.9 x 3.3 mm.
PERMUTED_ANISO = np.array([[0.0, -0.9, 0.0, 19.0], [-0.9, 0.0, 0.0, 21.0], [0.0, 0.0, 3.3, -18.0], [0, 0, 0, 1]])


def _ball(affine, radius_mm):
    ijk = np.indices(SHAPE).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(xyz - LESION_CENTRE_MM, axis=1) <= radius_mm).reshape(SHAPE)


def write_edit_cases(root):
    """Workflow records of three series: sub-01 baseline (oblique 1x1x4 mm) and m06 (permuted,
    0.9x0.9x3.3 mm) with a proposed mask (a 7 mm ball), sub-02 baseline (oblique 1x1x4 mm) with
    none (an error record: its case opens with an empty drawing)."""
    rng = np.random.default_rng(14)
    records = []
    for pid, sid, month, affine, ok in (("sub-01", "ses-baseline", 0, OBLIQUE_1x1x4, True),
                                         ("sub-01", "ses-m06", 6, PERMUTED_ANISO, True),
                                         ("sub-02", "ses-baseline", 0, OBLIQUE_1x1x4, False)):
        src = root / "imaging" / pid / sid / "anat" / f"{pid}_{sid}_T2w.nii.gz"
        inside = _ball(affine, 7.0)
        write_t2(src, 200 + 400 * inside + rng.normal(0, 8, SHAPE), affine, pid, sid)
        rec_dir = root / "results" / "work" / "series" / pid / sid
        record = {
            "participant_id": pid, "session_id": sid, "month": month, "status": "ok" if ok else "error",
            "message": None if ok else f"{src}: no seed for {pid}", "method": "auto" if ok else None,
            "volume_ml": float(inside.sum()) * abs(np.linalg.det(affine[:3, :3])) / 1000.0 if ok else None,
            "source_file": str(src), "source_sha256": sha256_file(src), "shape": list(SHAPE),
            "affine": affine.tolist(),
        }
        if ok:
            write_nifti(rec_dir / "mask.nii.gz", mask_image(inside, affine))
        else:
            rec_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(rec_dir / "mask.nii.gz", b"")
        (rec_dir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(rec_dir / "record.json")
    return records


@pytest.fixture
def package(tmp_path):
    find_niivue()
    records = write_edit_cases(tmp_path)
    results = tmp_path / "results"
    assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "141414141414",
                 *map(str, records)]) == 0
    codes = {(r["participant_id"], r["session_id"]): r["case_code"] for r in read_key(results) if r["case_code"]}
    return results, codes


# ---- driving the page as a reader does


def open_case(page, base, code):
    page.goto(f"{base}/case/{code}")
    page.wait_for_selector("body[data-ready='1']", timeout=30000)
    page.click("button[data-slice='0']")  # axial: one tile, the slices a reader paints on
    page.click("button.verdict[data-verdict='edited']")
    page.wait_for_function("() => window.khe.editing === true")


def show_slice_of(page, mm):
    """Scroll to the slice holding the point ``mm`` (RAS+); as a reader's scrolling, through the viewer."""
    page.evaluate("""(mm) => {
        const nv = window.khe.nv;
        nv.scene.crosshairPos = nv.vox2frac(nv.frac2vox(nv.mm2frac(mm, 0, true)));
        nv.drawScene();
    }""", list(map(float, mm)))


def screen_point(page, mm):
    """Page coordinates (CSS px) where the point ``mm`` is drawn on the current slice."""
    x, y = page.evaluate("""(mm) => {
        const nv = window.khe.nv;
        const pos = nv.frac2canvasPos(nv.mm2frac(mm, 0, true));
        const rect = document.getElementById('gl').getBoundingClientRect();
        return [rect.left + pos[0] / window.devicePixelRatio, rect.top + pos[1] / window.devicePixelRatio];
    }""", list(map(float, mm)))
    return x, y


def click_at(page, mm):
    show_slice_of(page, mm)
    page.mouse.click(*screen_point(page, mm))


def drawn_voxels(page):
    return page.evaluate("() => window.khe.editedVoxels")


def set_size(page, n):
    """The size slider, moved with its arrow keys (steps of 2 voxels from 1)."""
    page.focus("#brush-size")
    page.keyboard.press("Home")
    for _ in range((n - 1) // 2):
        page.keyboard.press("ArrowRight")
    assert page.input_value("#brush-size") == str(n)


def voxel_centre_mm(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


def expected_shape(affine, centre_ijk, radius_mm, plane_axis=None):
    """Native voxels whose centres lie within ``radius_mm`` of voxel ``centre_ijk``'s centre (in
    the slice ``plane_axis`` = its index when given: a disc; else a sphere)."""
    ijk = np.indices(SHAPE).reshape(3, -1).T
    d = (ijk - np.asarray(centre_ijk)) @ affine[:3, :3].T
    inside = np.linalg.norm(d, axis=1) <= radius_mm + 1e-6
    if plane_axis is not None:
        inside &= ijk[:, plane_axis] == centre_ijk[plane_axis]
    return inside.reshape(SHAPE)


def saved_mask(results, code, read):
    case = nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz")
    img = nib.Nifti1Image.from_bytes(gzip.decompress(read["edited_mask"]))
    return case, img, np.asarray(img.dataobj) != 0


def current_read(results, code):
    return {r["case_code"]: r for r in store.current_reads(results / "reads" / "R1.sqlite")}[code]


def save(page, revision):
    page.click("#save-edit")
    wait_status(page, f"Current: Edited (revision {revision})")


# ---- tests


def test_brush_size_eraser_and_3d_sphere_paint_in_physical_space_on_an_oblique_anisotropic_grid(package, tmp_path):
    results, codes = package
    code = codes[("sub-01", "ses-baseline")]
    affine = OBLIQUE_1x1x4
    proposed = _ball(affine, 7.0)
    # Three places in ordinary tissue, well away from the lesion and from each other.
    spots = [(10, 30, 6), (38, 12, 6), (36, 32, 5)]
    with reader_browser(results, tmp_path) as served:
        page = served.page
        open_case(page, served.base, code)
        start = drawn_voxels(page)
        assert start == int(proposed.sum())
        assert "1 voxel = 1.0 mm" in page.inner_text("#brush-size-text")

        # Size 1: one voxel. Size 7: a disc of 7 mm diameter in the clicked slice.
        click_at(page, voxel_centre_mm(affine, spots[0]))
        assert drawn_voxels(page) == start + 1
        set_size(page, 7)
        assert "7 voxels = 7.0 mm" in page.inner_text("#brush-size-text")
        click_at(page, voxel_centre_mm(affine, spots[1]))
        disc = expected_shape(affine, spots[1], 3.5, plane_axis=2)
        assert drawn_voxels(page) == start + 1 + int(disc.sum())

        # The 3D brush (key S): a sphere of radius 4.5 mm (size 9) on the 1x1x4 mm grid: three slices.
        page.keyboard.press("s")
        page.keyboard.press("]")  # size 7 -> 9
        assert page.is_checked("#brush-3d") and "9 voxels = 9.0 mm" in page.inner_text("#brush-size-text")
        click_at(page, voxel_centre_mm(affine, spots[2]))
        sphere = expected_shape(affine, spots[2], 4.5)
        assert len(np.unique(np.argwhere(sphere)[:, 2])) == 3  # 4 mm slices: k - 1, k, k + 1
        assert drawn_voxels(page) == start + 1 + int(disc.sum()) + int(sphere.sum())
        save(page, 1)
        case, img, mask = saved_mask(results, code, current_read(results, code))
        assert np.array_equal(mask & ~proposed, (expected_shape(affine, spots[0], 0.5) | disc | sphere))
        assert np.all(mask[proposed])

        # The eraser (key G) with a 2D disc of size 3 takes out a disc of the sphere's middle slice.
        page.keyboard.press("s")  # back to 2D
        page.keyboard.press("g")
        assert page.inner_text("#pen-state") == "2D brush: erase"
        set_size(page, 3)
        click_at(page, voxel_centre_mm(affine, spots[2]))
        rubbed = expected_shape(affine, spots[2], 1.5, plane_axis=2)
        assert int(rubbed.sum()) == 9  # 3x3 in plane (1 mm), one 4 mm slice
        save(page, 2)
        _, _, mask2 = saved_mask(results, code, current_read(results, code))
        assert np.array_equal(mask2, mask & ~rubbed)
    assert not served.errors, served.errors


def test_fill_between_slices_interpolates_the_empty_slices_and_undo_redo_step_through_it(package, tmp_path):
    results, codes = package
    code = codes[("sub-02", "ses-baseline")]  # no proposed mask: the reader draws the lesion
    affine = OBLIQUE_1x1x4
    with reader_browser(results, tmp_path) as served:
        page = served.page
        open_case(page, served.base, code)
        assert drawn_voxels(page) == 0
        # The reader paints the lesion on slices 3 and 8 only: a disc of 9 voxels' diameter on
        # slice 3, of 13 on slice 8, the centres 3 voxels apart in plane.
        set_size(page, 9)
        click_at(page, voxel_centre_mm(affine, (22, 20, 3)))
        set_size(page, 13)
        click_at(page, voxel_centre_mm(affine, (25, 20, 8)))
        low = expected_shape(affine, (22, 20, 3), 4.5, plane_axis=2)
        high = expected_shape(affine, (25, 20, 8), 6.5, plane_axis=2)
        assert drawn_voxels(page) == int(low.sum() + high.sum())
        assert page.evaluate("() => window.khe.hasUnsavedEdits()")

        page.keyboard.press("i")  # fill between slices
        assert page.inner_text("#edit-message").startswith("Filled 4 empty axial slices")
        filled_count = drawn_voxels(page)
        save(page, 1)
        _, _, mask = saved_mask(results, code, current_read(results, code))
        assert np.array_equal(mask[..., 3], low[..., 3]) and np.array_equal(mask[..., 8], high[..., 8])
        assert not mask[..., :3].any() and not mask[..., 9:].any()
        areas = [int(mask[..., k].sum()) for k in range(3, 9)]
        # The interpolated cross-sections grow from the small disc to the large one and move
        # across: each in-between slice is a filled blob between the two, none empty.
        assert areas[0] < areas[1] <= areas[2] <= areas[3] <= areas[4] < areas[5], areas
        centres_i = [np.argwhere(mask[..., k])[:, 0].mean() for k in range(3, 9)]
        assert all(a <= b + 0.25 for a, b in zip(centres_i, centres_i[1:])), centres_i
        for k in range(4, 8):
            assert mask[..., k][low[..., 3] & high[..., 8]].all()  # the part both discs share is in every slice
        assert filled_count == int(mask.sum())

        # Undo takes back the fill, then the big disc; redo brings them back in order.
        page.keyboard.press("Control+z")
        assert drawn_voxels(page) == int(low.sum() + high.sum())
        page.keyboard.press("Control+z")
        assert drawn_voxels(page) == int(low.sum())
        page.keyboard.press("Control+y")
        assert drawn_voxels(page) == int(low.sum() + high.sum())
        page.click("#edit-redo")
        assert drawn_voxels(page) == filled_count
        assert page.is_disabled("#edit-redo")
        assert not page.evaluate("() => window.khe.hasUnsavedEdits()")  # back to what was saved
    assert not served.errors, served.errors


def test_live_volume_is_the_volume_the_server_computes_and_the_saved_mask_is_on_the_image_grid(package, tmp_path):
    results, codes = package
    code = codes[("sub-01", "ses-m06")]  # permuted, flipped, 0.9 x 0.9 x 3.3 mm
    affine = PERMUTED_ANISO
    with reader_browser(results, tmp_path) as served:
        page = served.page
        # A short window: the canvas (its smallest height) runs below the window's edge, and a stroke must
        # neither scroll it nor resize it.
        page.set_viewport_size({"width": 1300, "height": 560})
        open_case(page, served.base, code)
        box = page.locator("#gl").bounding_box()
        assert box["y"] + box["height"] > 560
        assert not page.evaluate("() => window.khe.hasUnsavedEdits()")
        live_start = page.evaluate("() => window.khe.editedVolumeMl")
        voxel_mm3 = voxel_volume_mm3(nib.load(results / "qa" / "R1" / f"{code}_t2.nii.gz").affine)
        assert voxel_mm3 == pytest.approx(0.9 * 0.9 * 3.3, rel=1e-6)
        assert live_start == int(_ball(affine, 7.0).sum()) * voxel_mm3 / 1000
        # A stroke with a size-5 brush across the lesion's edge, then an erased dab inside it.
        set_size(page, 5)
        k = 6
        a, b = voxel_centre_mm(affine, (8, 20, k)), voxel_centre_mm(affine, (30, 26, k))
        show_slice_of(page, a)
        (xa, ya), (xb, yb) = screen_point(page, a), screen_point(page, b)
        page.mouse.move(xa, ya)
        page.mouse.down()
        for t in np.linspace(0, 1, 30)[1:]:
            page.mouse.move(xa + t * (xb - xa), ya + t * (yb - ya))
        page.mouse.up()
        assert page.locator("#gl").bounding_box() == box  # the page did not move under the pen
        assert page.evaluate("() => window.khe.hasUnsavedEdits()")
        page.click("#tool-eraser")
        click_at(page, voxel_centre_mm(affine, (24, 22, k)))
        live_ml = page.evaluate("() => window.khe.editedVolumeMl")
        assert live_ml != pytest.approx(live_start)
        assert page.inner_text("#live-volume").startswith(f"{live_ml:.2f} mL")
        save(page, 1)
        assert not page.evaluate("() => window.khe.hasUnsavedEdits()")
        read = current_read(results, code)
        assert read["edited_volume_ml"] == live_ml  # the same number, not just close
        case, img, mask = saved_mask(results, code, read)
        assert img.shape == case.shape and img.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, case.affine, atol=1e-5)
        # The stroke lies in the slice shown and between its ends, in world space.
        added = np.argwhere(mask & ~_ball(affine, 7.0))
        assert len(added) > 20 and set(added[:, 2]) == {k}
        ends = np.array([world_to_voxel(p, case.affine) for p in (a, b)])
        assert np.all(added[:, :2] >= ends[:, :2].min(axis=0) - 2.5)
        assert np.all(added[:, :2] <= ends[:, :2].max(axis=0) + 2.5)
    assert not served.errors, served.errors


def draw_loop(page, corners_mm):
    """A closed line through ``corners_mm`` (on the current slice) with the left button held."""
    # The mouse only reaches what is on screen: bring the image into view first, as a reader scrolls.
    page.evaluate("() => document.getElementById('gl').scrollIntoView({block: 'center'})")
    points = [screen_point(page, c) for c in corners_mm] + [screen_point(page, corners_mm[0])]
    page.mouse.move(*points[0])
    page.mouse.down()
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        for t in np.linspace(0, 1, 12)[1:]:
            page.mouse.move(x0 + t * (x1 - x0), y0 + t * (y1 - y0))
    page.mouse.up()


def test_filled_outline_paints_and_erases_one_undo_step_each_and_keys_save(package, tmp_path):
    results, codes = package
    code = codes[("sub-02", "ses-baseline")]  # an empty drawing
    affine = OBLIQUE_1x1x4
    k = 5
    outer = [voxel_centre_mm(affine, ijk) for ijk in ((12, 10, k), (34, 10, k), (34, 30, k), (12, 30, k))]
    inner = [voxel_centre_mm(affine, ijk) for ijk in ((20, 17, k), (26, 17, k), (26, 23, k), (20, 23, k))]
    with reader_browser(results, tmp_path) as served:
        page = served.page
        open_case(page, served.base, code)
        page.keyboard.press("f")
        assert page.inner_text("#pen-state") == "filled outline: paint"
        show_slice_of(page, outer[0])
        draw_loop(page, outer)
        page.wait_for_function("() => window.khe.editedVoxels > 0")
        painted = drawn_voxels(page)
        page.keyboard.press("g")  # the outline now erases
        assert page.inner_text("#pen-state") == "filled outline: erase"
        draw_loop(page, inner)
        page.wait_for_function("(n) => window.khe.editedVoxels < n", arg=painted)
        holed = drawn_voxels(page)
        page.keyboard.press("Control+s")
        wait_status(page, "Current: Edited (revision 1)")
        _, _, mask = saved_mask(results, code, current_read(results, code))
        assert int(mask.sum()) == holed
        assert set(np.argwhere(mask)[:, 2]) == {k}
        # The square's inside is drawn, less the inner square's, and nothing outside the outer one.
        ring = np.zeros(SHAPE, bool)
        ring[13:34, 11:30, k] = True
        ring[19:28, 16:25, k] = False
        assert mask[ring].all()
        assert not mask[21:26, 18:23, k].any()
        assert not mask[:11, :, k].any() and not mask[36:, :, k].any()
        assert not mask[:, :9, k].any() and not mask[:, 32:, k].any()
        # Each outline is one undo step.
        page.keyboard.press("Control+z")
        assert drawn_voxels(page) == painted
        page.keyboard.press("Control+z")
        assert drawn_voxels(page) == 0
        page.keyboard.press("Control+Shift+z")
        assert drawn_voxels(page) == painted
    assert not served.errors, served.errors
