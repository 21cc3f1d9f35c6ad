// Mask editing on the case page (the "Edited" verdict), as a reader used to ITK-SNAP expects:
// a round brush and eraser (2D disc on the slice under the pointer, or 3D sphere) whose size is
// in voxels with its millimetres shown, NiiVue's filled outline, fill between slices, undo/redo
// and the edited volume live. Loaded after case.js, which exposes what this needs on window.khe.
//
// The drawing is NiiVue's drawBitmap: one byte per voxel of the image the page loaded, in
// NiiVue's RAS-permuted order of that image's own voxels (a permutation and flips of the native
// grid, never a resampling), so voxel counts and voxel volume are those of the native grid.
// Distances are physical: every brush shape is measured in mm through the image's affine.
(function () {
  "use strict";
  const khe = window.khe;
  const $ = khe.$;
  const nv = khe.nv;
  const MAX_SIZE_VOX = 41;  // brush diameter, voxels
  const MAX_HISTORY = 200;  // undo steps kept (each holds only the voxels it changed)
  // NiiVue's slice types of a 2D tile and the drawing axis each one is a slice of.
  const PLANE_AXIS = { 0: 2, 1: 1, 2: 0 };  // axial: z, coronal: y, sagittal: x
  const AXIS_NAME = ["sagittal", "coronal", "axial"];

  let grid = null;          // geometry of the drawing (imageGrid), once the image is loaded
  let tool = "navigate";    // brush | outline | navigate
  let erasing = false;      // the brush / outline clears instead of paints
  let sphere = false;       // 3D brush
  let sizeVox = 1;          // brush diameter in voxels of the finest spacing (odd)
  let base = null;          // the drawing as of the last recorded history step
  let saved = null;         // the drawing as last loaded or saved
  let undoStack = [];
  let redoStack = [];
  let planeAxis = null;     // drawing axis of the slices last painted in 2D
  let stroke = null;        // the brush stroke under way

  // ---- geometry
  function sub(a, b) { return [a[0] - b[0], a[1] - b[1], a[2] - b[2]]; }
  function norm(a) { return Math.hypot(a[0], a[1], a[2]); }
  function det3(c) {
    return c[0][0] * (c[1][1] * c[2][2] - c[1][2] * c[2][1])
      - c[1][0] * (c[0][1] * c[2][2] - c[0][2] * c[2][1])
      + c[2][0] * (c[0][1] * c[1][2] - c[0][2] * c[1][1]);
  }
  // Rows of the inverse of the matrix whose columns are c[0], c[1], c[2].
  function inverse3(c) {
    const cross = function (a, b) { return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]; };
    const det = det3(c);
    return [cross(c[1], c[2]), cross(c[2], c[0]), cross(c[0], c[1])].map(function (row) {
      return row.map(function (x) { return x / det; });
    });
  }
  // The drawing's voxel -> RAS+ mm map (the NIfTI sform/qform NiiVue read, not its de-obliqued
  // display frame): cols[a] is the mm step of one voxel along drawing axis a.
  function imageGrid() {
    const back = nv.back;
    const dims = [back.dims[1], back.dims[2], back.dims[3]];
    const mm = function (v) { return Array.from(nv.frac2mm(nv.vox2frac(v), 0, true)).slice(0, 3); };
    const origin = mm([0, 0, 0]);
    const cols = [[1, 0, 0], [0, 1, 0], [0, 0, 1]].map(function (e) { return sub(mm(e), origin); });
    const spacing = cols.map(norm);
    // The acquisition (slice) axis: the coarsest spacing; among equals the native third axis.
    const nativeK = back.permRAS.map(Math.abs).indexOf(3);
    let acq = nativeK;
    [0, 1, 2].forEach(function (a) { if (spacing[a] > spacing[acq] * (1 + 1e-6)) { acq = a; } });
    // The voxel volume is the server's (the header's, as every volume khe-vol reports), checked
    // against the grid the viewer shows: a disagreement is said, never a live volume off the saved one.
    const viewerMm3 = Math.abs(det3(cols));
    const serverMm3 = khe.view.voxel_volume_mm3;
    const agrees = serverMm3 > 0 && Math.abs(viewerMm3 / serverMm3 - 1) < 1e-4;
    return {
      dims: dims, cols: cols, spacing: spacing, acquisitionAxis: acq,
      minSpacingMm: Math.min.apply(null, spacing),
      voxelMm3: agrees ? serverMm3 : NaN,
    };
  }
  function radiusMm() { return sizeVox * grid.minSpacingMm / 2; }

  // Voxel offsets within radiusMm() of a voxel centre, in physical space: a sphere, or a disc in
  // the slice plane normal to drawing axis `axis`. Cached per shape.
  let shapeKey = null;
  let shapeOffsets = null;
  function offsets(axis) {
    const key = [sizeVox, sphere ? "3d" : axis].join(":");
    if (key === shapeKey) { return shapeOffsets; }
    const r = radiusMm() + 1e-6;
    const c = grid.cols;
    // |M d| <= r bounds d along axis a by r times the norm of row a of M^-1 (exact for any
    // shear or rotation of the grid).
    const inv = inverse3(c);
    const n = [0, 1, 2].map(function (a) { return Math.floor(r * norm(inv[a])) + 1; });
    const out = [];
    for (let k = -n[2]; k <= n[2]; k++) {
      for (let j = -n[1]; j <= n[1]; j++) {
        for (let i = -n[0]; i <= n[0]; i++) {
          const d = [i, j, k];
          if (!sphere && d[axis] !== 0) { continue; }
          const x = c[0][0] * i + c[1][0] * j + c[2][0] * k;
          const y = c[0][1] * i + c[1][1] * j + c[2][1] * k;
          const z = c[0][2] * i + c[1][2] * j + c[2][2] * k;
          if (x * x + y * y + z * z <= r * r) { out.push(d); }
        }
      }
    }
    shapeKey = key;
    shapeOffsets = out;
    return out;
  }

  // ---- history: each step keeps the voxels it changed, their values before and after
  function commit() {
    const bm = nv.drawBitmap;
    if (!bm || !base) { return false; }
    const idx = [];
    for (let i = 0; i < bm.length; i++) { if (bm[i] !== base[i]) { idx.push(i); } }
    if (!idx.length) { showVolume(); return false; }
    const step = { idx: Int32Array.from(idx), before: new Uint8Array(idx.length), after: new Uint8Array(idx.length) };
    for (let n = 0; n < idx.length; n++) {
      step.before[n] = base[idx[n]];
      step.after[n] = bm[idx[n]];
      base[idx[n]] = bm[idx[n]];
    }
    undoStack.push(step);
    if (undoStack.length > MAX_HISTORY) { undoStack.shift(); }
    redoStack = [];
    showVolume();
    return true;
  }
  function apply(step, values) {
    const bm = nv.drawBitmap;
    for (let n = 0; n < step.idx.length; n++) {
      bm[step.idx[n]] = values[n];
      base[step.idx[n]] = values[n];
    }
    nv.refreshDrawing(true);
    showVolume();
  }
  function undo() {
    if (!undoStack.length) { return; }
    commit();  // anything drawn outside a recorded step is a step of its own first
    const step = undoStack.pop();
    apply(step, step.before);
    redoStack.push(step);
    showVolume();
  }
  function redo() {
    if (!redoStack.length) { return; }
    const step = redoStack.pop();
    apply(step, step.after);
    undoStack.push(step);
    showVolume();
  }
  function resetHistory() {
    base = nv.drawBitmap ? nv.drawBitmap.slice() : null;
    undoStack = [];
    redoStack = [];
  }

  // ---- live volume: voxel count x voxel volume of the image grid
  function drawnVoxels() {
    const bm = nv.drawBitmap;
    let n = 0;
    if (bm) { for (let i = 0; i < bm.length; i++) { if (bm[i] !== 0) { n++; } } }
    return n;
  }
  function showVolume() {
    if (!grid) { return; }
    const n = drawnVoxels();
    khe.editedVoxels = n;
    khe.editedVolumeMl = n * grid.voxelMm3 / 1000;
    $("live-volume").textContent = isNaN(grid.voxelMm3)
      ? "n/a (the viewer's voxel size differs from the image header's: save, the server measures it) "
        + n + " voxels"
      : khe.editedVolumeMl.toFixed(2) + " mL (" + n + " voxels of " + grid.voxelMm3.toFixed(3) + " mm\u00b3)";
    $("edit-undo").disabled = !undoStack.length;
    $("edit-redo").disabled = !redoStack.length;
  }

  // ---- brush: own painting (NiiVue's pen is square and 2D only)
  function pointerVoxel(e, tile) {
    const rect = $("gl").getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const x = (e.clientX - rect.left) * dpr;
    const y = (e.clientY - rect.top) * dpr;
    if (tile === undefined) { tile = nv.tileIndex(x, y); }
    if (tile < 0 || !nv.screenSlices[tile] || !(nv.screenSlices[tile].axCorSag in PLANE_AXIS)) { return null; }
    const frac = nv.canvasPos2frac([x, y]);
    if (!(frac[0] >= 0 && frac[0] <= 1 && frac[1] >= 0 && frac[1] <= 1 && frac[2] >= 0 && frac[2] <= 1)) {
      return null;
    }
    // Continuous voxel position (for a gap-free stroke); voxel centres are whole numbers.
    const vox = [0, 1, 2].map(function (a) { return frac[a] * grid.dims[a] - 0.5; });
    return { tile: tile, axis: PLANE_AXIS[nv.screenSlices[tile].axCorSag], vox: vox };
  }
  function paintAt(centre, axis) {
    const bm = nv.drawBitmap;
    const d = grid.dims;
    const value = erasing ? 0 : 1;
    offsets(axis).forEach(function (o) {
      const i = centre[0] + o[0], j = centre[1] + o[1], k = centre[2] + o[2];
      if (i < 0 || j < 0 || k < 0 || i >= d[0] || j >= d[1] || k >= d[2]) { return; }
      bm[i + d[0] * (j + d[1] * k)] = value;
    });
  }
  function paintTo(vox) {
    // Dab every voxel the pointer crossed since the last event (steps of half a voxel).
    const from = stroke.last;
    const steps = Math.max(1, Math.ceil(2 * Math.max(Math.abs(vox[0] - from[0]), Math.abs(vox[1] - from[1]),
                                                     Math.abs(vox[2] - from[2]))));
    for (let s = 1; s <= steps; s++) {
      const t = s / steps;
      const c = [0, 1, 2].map(function (a) {
        return Math.min(grid.dims[a] - 1, Math.max(0, Math.round(from[a] + t * (vox[a] - from[a]))));
      });
      const key = c.join(",");
      if (!stroke.done.has(key)) { stroke.done.add(key); paintAt(c, stroke.axis); }
    }
    stroke.last = vox;
    nv.refreshDrawing(true);
  }
  // While the brush is on, the viewer does not see the left button: no crosshair drag under the
  // stroke, and none of its canvas.focus() calls, which scroll a partly visible canvas mid-stroke.
  $("gl").parentNode.addEventListener("mousedown", function (e) {
    if (!khe.editing || tool !== "brush" || e.button !== 0 || e.target !== $("gl")) { return; }
    e.preventDefault();
    e.stopPropagation();
    $("gl").focus({ preventScroll: true });  // keys go to the page, not a text box left focused
  }, true);
  $("gl").addEventListener("pointerdown", function (e) {
    if (!khe.editing || tool !== "brush" || e.button !== 0 || !grid) { return; }
    const at = pointerVoxel(e);
    if (!at) { return; }
    stroke = { tile: at.tile, axis: at.axis, last: at.vox, done: new Set() };
    if (!sphere) { planeAxis = at.axis; }
    paintTo(at.vox);
  });
  $("gl").addEventListener("pointermove", function (e) {
    if (!stroke) { return; }
    const at = pointerVoxel(e, stroke.tile);
    if (at) { paintTo(at.vox); }
  });
  function endStroke() {
    if (!stroke) { return; }
    stroke = null;
    commit();
  }
  window.addEventListener("pointerup", endStroke);
  $("gl").addEventListener("pointerleave", endStroke);

  // NiiVue's own pen (filled outline) and drawings loaded by case.js (click segmentation).
  nv.addEventListener("drawingChanged", function (e) {
    const action = e.detail && e.detail.action;
    if (action === "draw") {
      if (nv.drawPenAxCorSag in PLANE_AXIS) { planeAxis = PLANE_AXIS[nv.drawPenAxCorSag]; }
      commit();
    } else if (action === "load") {
      // A new drawing replaces the old one: not an edit, and nothing to undo into.
      resetHistory();
      saved = nv.drawBitmap ? nv.drawBitmap.slice() : null;
      showVolume();
    }
  });

  // ---- fill between slices: shape-based interpolation of every run of empty slices between
  // two drawn slices, along the axis of the slices last painted in 2D (else the acquisition axis).
  // Each drawn slice becomes a signed distance map in mm (in-plane spacing); a voxel of an empty
  // slice is filled where the distance interpolated linearly between the two slices is <= 0.
  const BIG = 1e12;  // "no feature in this row" in squared mm
  function edt1d(f, n, w2, out) {
    // Felzenszwalb & Huttenlocher's exact 1D squared distance transform, sample spacing^2 = w2.
    const v = new Int32Array(n);
    const z = new Float64Array(n + 1);
    const cut = function (q, p) { return ((f[q] + w2 * q * q) - (f[p] + w2 * p * p)) / (2 * w2 * (q - p)); };
    let k = 0;
    v[0] = 0; z[0] = -Infinity; z[1] = Infinity;
    for (let q = 1; q < n; q++) {
      let s = cut(q, v[k]);
      while (s <= z[k]) { k--; s = cut(q, v[k]); }  // z[0] = -Infinity stops it at k = 0
      k++; v[k] = q; z[k] = s; z[k + 1] = Infinity;
    }
    k = 0;
    for (let q = 0; q < n; q++) {
      while (z[k + 1] < q) { k++; }
      out[q] = w2 * (q - v[k]) * (q - v[k]) + f[v[k]];
    }
  }
  // Squared distance (mm^2) of every pixel of an nu x nv slice to the nearest pixel with feature[p].
  function edt2d(feature, nu, nvv, su, sv) {
    const d = new Float64Array(nu * nvv);
    const f = new Float64Array(Math.max(nu, nvv));
    const out = new Float64Array(Math.max(nu, nvv));
    for (let j = 0; j < nvv; j++) {
      for (let i = 0; i < nu; i++) { f[i] = feature[i + nu * j] ? 0 : BIG; }
      edt1d(f, nu, su * su, out);
      for (let i = 0; i < nu; i++) { d[i + nu * j] = out[i]; }
    }
    for (let i = 0; i < nu; i++) {
      for (let j = 0; j < nvv; j++) { f[j] = d[i + nu * j]; }
      edt1d(f, nvv, sv * sv, out);
      for (let j = 0; j < nvv; j++) { d[i + nu * j] = out[j]; }
    }
    return d;
  }
  function fillBetweenSlices() {
    const axis = planeAxis !== null ? planeAxis : grid.acquisitionAxis;
    const d = grid.dims;
    const [u, w] = [0, 1, 2].filter(function (a) { return a !== axis; });
    const nu = d[u], nw = d[w], ns = d[axis];
    const stride = [1, d[0], d[0] * d[1]];
    const bm = nv.drawBitmap;
    const at = function (s, i, j) { return s * stride[axis] + i * stride[u] + j * stride[w]; };
    const slice = function (s) {
      const m = new Uint8Array(nu * nw);
      for (let j = 0; j < nw; j++) { for (let i = 0; i < nu; i++) { m[i + nu * j] = bm[at(s, i, j)] !== 0 ? 1 : 0; } }
      return m;
    };
    const drawn = [];
    for (let s = 0; s < ns; s++) {
      const m = slice(s);
      if (m.some(function (x) { return x; })) { drawn.push(s); }
    }
    const sdfCache = new Map();
    const sdf = function (s) {
      if (!sdfCache.has(s)) {
        const m = slice(s);
        const out = edt2d(m, nu, nw, grid.spacing[u], grid.spacing[w]);  // to the nearest drawn pixel
        const inv = edt2d(m.map(function (x) { return 1 - x; }), nu, nw, grid.spacing[u], grid.spacing[w]);
        const sd = new Float64Array(nu * nw);
        for (let p = 0; p < sd.length; p++) { sd[p] = Math.sqrt(out[p]) - Math.sqrt(inv[p]); }
        sdfCache.set(s, sd);
      }
      return sdfCache.get(s);
    };
    let filled = 0;
    for (let n = 1; n < drawn.length; n++) {
      const lo = drawn[n - 1], hi = drawn[n];
      if (hi - lo < 2) { continue; }
      const a = sdf(lo), b = sdf(hi);
      for (let s = lo + 1; s < hi; s++) {
        const t = (s - lo) / (hi - lo);
        for (let j = 0; j < nw; j++) {
          for (let i = 0; i < nu; i++) {
            const p = i + nu * j;
            if ((1 - t) * a[p] + t * b[p] <= 0) { bm[at(s, i, j)] = 1; }
          }
        }
        filled++;
      }
    }
    nv.refreshDrawing(true);
    commit();
    $("edit-message").textContent = filled
      ? "Filled " + filled + " empty " + AXIS_NAME[axis] + " slice" + (filled > 1 ? "s" : "") + " between drawn slices."
      : "Nothing to fill: no empty " + AXIS_NAME[axis] + " slice lies between two drawn slices.";
    return filled;
  }

  // ---- tools and their state on screen
  function showTool() {
    const verb = erasing ? "erase" : "paint";
    let text = "navigating (the pen is off)";
    if (tool === "brush") {
      text = (sphere ? "3D sphere" : "2D brush") + ": " + verb;
    } else if (tool === "outline") {
      text = "filled outline: " + verb;
    }
    $("pen-state").textContent = text;
    [["tool-brush", tool === "brush" && !erasing], ["tool-eraser", tool === "brush" && erasing],
     ["tool-outline", tool === "outline"], ["pen-off", tool === "navigate"]].forEach(function (p) {
      $(p[0]).setAttribute("aria-pressed", p[1] ? "true" : "false");
    });
    $("brush-3d").checked = sphere;
    $("brush-size").value = String(sizeVox);
    const diameterMm = grid ? 2 * radiusMm() : NaN;
    $("brush-size-text").textContent = sizeVox + " voxel" + (sizeVox > 1 ? "s" : "")
      + (grid ? " = " + diameterMm.toFixed(1) + " mm" : "") + (sphere ? " (sphere diameter)" : " (diameter)");
  }
  function setTool(name, erase) {
    tool = name;
    if (erase !== undefined) { erasing = erase; }
    // NiiVue's pen only for the filled outline; the brush is painted here.
    nv.setDrawingEnabled(tool === "outline");
    if (tool === "outline") {
      nv.opts.penSize = 1;
      nv.setPenValue(erasing ? 0 : 1, true);
    }
    showTool();
  }
  function setSize(n) {
    sizeVox = Math.max(1, Math.min(MAX_SIZE_VOX, Math.round(n)));
    if (sizeVox % 2 === 0) { sizeVox += 1; }  // odd: centred on the clicked voxel
    showTool();
  }

  // Called by case.js when the reader presses "Edited".
  khe.startEditing = function () {
    // A pen drawing cannot be recomputed from clicks: it is saved as drawn, without them.
    khe.dropClicks();
    if (!khe.editing) {
      grid = grid || imageGrid();
      resetHistory();
    }
    khe.editing = true;
    $("edit-tools").hidden = false;
    khe.fitCanvas();  // the pen's toolbar moved the canvas down: fitted now, not under the first stroke
    $("show-mask").checked = true;
    khe.applyMaskDisplay();  // case.js: the reader's opacity and outline choice, now with the mask on
    setTool("brush", false);
    showVolume();
    $("error").textContent = "Correct the mask (red), then Save edited mask. (Pen edits are saved as drawn, "
      + "without clicks; a new click would redraw the mask from the clicks.)";
  };
  // True when the drawing differs from what was last loaded or saved (for the leave warning).
  khe.hasUnsavedEdits = function () {
    const bm = nv.drawBitmap;
    if (!bm || !saved) { return false; }
    if (bm.length !== saved.length) { return true; }
    for (let i = 0; i < bm.length; i++) { if (bm[i] !== saved[i]) { return true; } }
    return false;
  };
  khe.edit = { undo: undo, redo: redo, fillBetweenSlices: fillBetweenSlices, setSize: setSize,
               grid: function () { return grid; } };

  async function saveEdit() {
    // filename "" makes NiiVue return the NIfTI bytes instead of downloading them.
    const bytes = await nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    if (!(bytes instanceof Uint8Array)) {
      $("error").textContent = "Not saved: the viewer has no drawing to save";
      return;
    }
    const drawing = nv.drawBitmap.slice();
    if (await khe.submit("edited", bytes)) { saved = drawing; }
  }

  $("tool-brush").addEventListener("click", function () { setTool("brush", false); });
  $("tool-eraser").addEventListener("click", function () { setTool("brush", true); });
  $("tool-outline").addEventListener("click", function () { setTool("outline", erasing); });
  $("pen-off").addEventListener("click", function () { setTool("navigate"); });
  $("brush-3d").addEventListener("change", function (e) { sphere = e.target.checked; showTool(); });
  $("brush-size").addEventListener("input", function (e) { setSize(Number(e.target.value)); });
  $("fill-between").addEventListener("click", fillBetweenSlices);
  $("edit-undo").addEventListener("click", undo);
  $("edit-redo").addEventListener("click", redo);
  $("save-edit").addEventListener("click", saveEdit);

  // Keys while editing (case.js leaves Ctrl keys to this script then). One rule for Ctrl+Z:
  // the active tool's history (here the pen's; the clicks' when not editing).
  document.addEventListener("keydown", function (e) {
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && !/^(range|checkbox|button)$/.test(t.type)));
    if (!khe.editing || typing || e.altKey) { return; }
    const key = e.key.toLowerCase();
    const ctrl = e.ctrlKey || e.metaKey;
    let handled = true;
    if (ctrl && key === "z" && !e.shiftKey) { undo(); }
    else if (ctrl && (key === "y" || (key === "z" && e.shiftKey))) { redo(); }
    else if (ctrl && key === "s") { saveEdit(); }
    else if (ctrl) { handled = false; }
    // Keys of their own (case.js's X, O and D keep their one meaning while editing: crosshair,
    // outline display, the Edited verdict).
    else if (key === "b") { setTool("brush", false); }
    else if (key === "g") { setTool(tool === "navigate" ? "brush" : tool, !erasing); }
    else if (key === "f") { setTool("outline", erasing); }
    else if (key === "s") { sphere = !sphere; showTool(); }
    else if (e.key === "]") { setSize(sizeVox + 2); }
    else if (e.key === "[") { setSize(sizeVox - 2); }
    else if (key === "i") { fillBetweenSlices(); }
    else if (e.key === "Escape") { setTool("navigate"); }
    else { handled = false; }
    if (handled) {
      // Others' keys (case.js, the viewer's) must not act on the same stroke of a key.
      e.preventDefault();
      e.stopImmediatePropagation();
    }
  });

  // NiiVue focuses its canvas on every press and drag (for its keys); a plain focus() scrolls a
  // canvas that runs below the window's edge into view, moving the page under the reader's pen
  // mid-stroke. Its focus never scrolls.
  const canvas = $("gl");
  const focusCanvas = canvas.focus.bind(canvas);
  canvas.focus = function (options) { focusCanvas(Object.assign({}, options, { preventScroll: true })); };

  khe.whenReady.then(function () {
    grid = imageGrid();
    saved = nv.drawBitmap ? nv.drawBitmap.slice() : null;
    showTool();
  });
  showTool();
})();
