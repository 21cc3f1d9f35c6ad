// Longitudinal reading: the earlier timepoint (T1) and its final mask beside the case being read,
// in a second NiiVue pane. Linked to the case's viewer (window.khe.nv, from case.js):
// - crosshair in physical space: scanner RAS+ mm through each series' own voxel-to-world transform
//   (the two series have different grids and affines, so never by voxel index or fraction);
// - each pane opens on its own lesion (T1's mask; the case's, else T1's lesion when its proposal is
//   empty), in its acquisition plane, with its own window (the server's robust preset of each series);
// - window/level changes matched on each series' own "auto" window: the same place between them in
//   both, as follow-ups may be stored on another intensity scale (a 0 mL follow-up never darkens T1);
// - zoom, and the point in the middle of the view (scanner mm, through each series' own transform),
//   view (axial/coronal/sagittal/multiplanar), the left/right convention and the native plane /
//   scanner-axes reslicing (isSliceMM);
// - T1's volume and the % change of the volume on screen from it, beside the panes;
// - the display the reader sets on the case (mask shown, outline, opacity; crosshair shown), so
//   hiding the crosshair or the mask hides it in both panes.
// Either pane drives the other. Loaded only for a follow-up of a longitudinal worklist.
(async function () {
  "use strict";
  const view = JSON.parse(document.getElementById("case-data").textContent);
  const lon = view.longitudinal;
  if (!lon) { return; }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  // Where this case stands in the participant's scans (no session, month or date: only the order).
  const info = el("p", { id: "timepoint", class: "timepoint-info" },
    "Participant " + lon.participant + ": T" + lon.timepoint + " of " + lon.n_timepoints
    + (lon.prior ? " (shown beside T" + lon.prior.timepoint + ", the first scan, which the response is "
      + "measured against)" : " (the first scan)"));
  const nav = document.querySelector("nav.steps");
  nav.parentNode.insertBefore(info, nav.nextSibling);
  window.kheCompare = { prior: null, ready: false };
  if (!lon.prior) {
    document.body.dataset.compareReady = "1";
    return;
  }

  // Wait for the case's own viewer (case.js sets window.khe.ready when it has loaded).
  await new Promise(function (resolve) {
    (function check() {
      if (window.khe && window.khe.ready) { resolve(); } else { setTimeout(check, 50); }
    })();
  });
  const nv = window.khe.nv;

  // Two panes side by side: the earlier timepoint on the left, this case on the right.
  const box = document.querySelector(".canvas-box");
  const row = el("div", { class: "compare-row", id: "compare-row" });
  box.parentNode.insertBefore(row, box);
  const priorFig = el("figure", { class: "pane prior-pane", id: "prior-pane" });
  const priorCap = el("figcaption", { id: "prior-caption" });
  priorCap.append(el("strong", {}, "T" + lon.prior.timepoint + " (earlier)"),
                  document.createTextNode(" mask: " + lon.prior.mask_source + " "),
                  el("span", { id: "prior-outside", class: "outside", hidden: "" },
                     "this point is outside T" + lon.prior.timepoint + "'s field of view"));
  const priorBox = el("div", { class: "canvas-box" });
  priorBox.append(el("canvas", { id: "gl-prior" }));
  priorFig.append(priorCap, priorBox);
  const currentFig = el("figure", { class: "pane current-pane" });
  const currentCap = el("figcaption", { id: "current-caption" });
  currentCap.append(el("strong", {}, "T" + lon.timepoint + " (this case)"), document.createTextNode(" "),
                    el("span", { id: "volume-change", class: "change" }));
  currentFig.append(currentCap);
  row.append(priorFig, currentFig);
  currentFig.append(box);  // moving the canvas keeps its WebGL context
  priorCap.append(document.createTextNode(" "), el("span", { id: "prior-volume", class: "change" },
    lon.prior.volume_ml === null ? "volume: none" : "volume " + lon.prior.volume_ml.toFixed(2) + " mL"));
  const priorInfo = el("p", { id: "prior-pane-info", class: "pane-info" });
  priorInfo.append(el("span", { id: "prior-slice-mm" }), document.createTextNode(" "),
                   el("span", { id: "prior-reformat", class: "reformat", hidden: "" }));
  priorBox.append(priorInfo);
  window.khe.fitCanvas();

  const pv = new niivue.Niivue({
    backColor: [0, 0, 0, 1],
    show3Dcrosshair: true,
    crosshairColor: [0.2, 0.8, 1.0, 0.7],
    isNearestInterpolation: true,
    dragAndDropEnabled: false,
    showLegend: false,
    isColorbar: false,
    logLevel: "warn",
    isRadiologicalConvention: nv.opts.isRadiologicalConvention,
    isSliceMM: nv.opts.isSliceMM,
  });
  await pv.attachTo("gl-prior");
  try {
    await pv.loadVolumes([{ url: lon.prior.image_url }]);
    if (lon.prior.mask_url) {
      await pv.loadDrawingFromUrl(lon.prior.mask_url, true);
    } else {
      pv.createEmptyDrawing();
    }
  } catch (err) {
    priorCap.append(el("span", { class: "error" }, " T" + lon.prior.timepoint + " could not be loaded (" + err + ")"));
    document.body.dataset.compareReady = "1";
    return;
  }
  pv.setDrawingEnabled(false);
  window.khe.fitCanvas();

  // ---- opening: T1 on its own lesion, with its own window; the case on its lesion, or on T1's
  // when its proposal is empty (a 0 mL follow-up still opens where the lesion was).
  const priorLesion = window.khe.lesionWorld(pv);
  if (!window.khe.openLesion() && priorLesion) { window.khe.setOpenLesion(priorLesion); }
  window.khe.showLesion(pv, priorLesion || window.khe.openLesion());
  const priorWindows = lon.prior.windows;
  if (priorWindows && priorWindows.auto) {
    pv.volumes[0].cal_min = priorWindows.auto[0];
    pv.volumes[0].cal_max = priorWindows.auto[1];
    pv.updateGLVolume();
  }

  // ---- the case's display settings (case.js's mask and crosshair boxes) hold for T1's pane
  function displayOf(v) {
    return [v.opts.crosshairWidth, ...v.opts.crosshairColor, v.drawOpacity, v.drawRimOpacity].join(",");
  }
  function copyDisplay() {
    pv.setCrosshairColor(nv.opts.crosshairColor.slice());
    pv.setCrosshairWidth(nv.opts.crosshairWidth);
    pv.drawRimOpacity = nv.drawRimOpacity;
    pv.setDrawOpacity(nv.drawOpacity);
  }
  copyDisplay();
  let shownDisplay = displayOf(nv);

  // ---- linking
  function worldMM(v) {
    // isForceSliceMM: the series' true voxel-to-world transform, not the display's de-obliqued frame.
    return Array.from(v.frac2mm(v.scene.crosshairPos, 0, true)).slice(0, 3);
  }
  // Each series' own reference window: the server's robust preset, else NiiVue's robust range.
  const caseWindows = view.image_info && view.image_info.windows;
  function robust(v) {
    const w = v === pv ? priorWindows : caseWindows;
    if (w && w.auto && w.auto[1] > w.auto[0]) { return w.auto; }
    const vol = v.volumes[0];
    return [vol.robust_min, vol.robust_max];
  }
  // The point in the middle of a pane's view, scanner RAS+ mm (NiiVue shows (extent - pan) / zoom).
  function viewCentreWorld(v) {
    const p = v.scene.pan2Dxyzmm;
    const mid = Array.from(v.frac2mm([0.5, 0.5, 0.5]));
    const display = [0, 1, 2].map(function (a) { return (mid[a] - p[a]) / p[3]; });
    return Array.from(v.frac2mm(v.mm2frac(display), 0, true)).slice(0, 3);
  }
  function setViewCentre(v, world, zoom) {
    const display = Array.from(v.frac2mm(v.mm2frac(world, 0, true)));
    const mid = Array.from(v.frac2mm([0.5, 0.5, 0.5]));
    v.scene.pan2Dxyzmm = [0, 1, 2].map(function (a) { return mid[a] - zoom * display[a]; }).concat([zoom]);
  }
  // cal value of `from` -> the same place between robust min and max of `to`.
  function mapLevel(x, from, to) {
    const [a0, a1] = robust(from);
    const [b0, b1] = robust(to);
    if (!(a1 > a0) || !(b1 > b0)) { return x; }
    return b0 + (x - a0) * (b1 - b0) / (a1 - a0);
  }
  function state(v) {
    const vol = v.volumes[0];
    return [...v.scene.crosshairPos, ...v.scene.pan2Dxyzmm, v.opts.sliceType, vol.cal_min, vol.cal_max,
            v.opts.isRadiologicalConvention ? 1 : 0, v.opts.isSliceMM ? 1 : 0].join(",");
  }
  function push(from, to) {
    const mm = worldMM(from);
    const frac = to.mm2frac(mm, 0, true);
    to.scene.crosshairPos = frac;
    setViewCentre(to, viewCentreWorld(from), from.scene.pan2Dxyzmm[3]);
    if (to.opts.sliceType !== from.opts.sliceType) { to.setSliceType(from.opts.sliceType); }
    if (to.opts.isRadiologicalConvention !== from.opts.isRadiologicalConvention) {
      to.setRadiologicalConvention(from.opts.isRadiologicalConvention);
    }
    // Both panes in their own acquisition plane, or both resliced along the scanner axes.
    if (to.opts.isSliceMM !== from.opts.isSliceMM) { to.setSliceMM(from.opts.isSliceMM); }
    const src = from.volumes[0];
    const dst = to.volumes[0];
    const lo = mapLevel(src.cal_min, from, to);
    const hi = mapLevel(src.cal_max, from, to);
    if (dst.cal_min !== lo || dst.cal_max !== hi) {
      dst.cal_min = lo;
      dst.cal_max = hi;
      to.updateGLVolume();
    }
    to.drawScene();
    const priorFrac = to === pv ? frac : pv.scene.crosshairPos;
    const outside = Array.from(priorFrac).some(function (f) { return f < 0 || f > 1; });
    document.getElementById("prior-outside").hidden = !outside;
  }
  // Each pane starts on its own lesion; then, every frame, whichever pane changed drives the other.
  let seen = [state(nv), state(pv)];
  function tick() {
    if (displayOf(nv) !== shownDisplay) {
      copyDisplay();
      shownDisplay = displayOf(nv);
    }
    const now = [state(nv), state(pv)];
    if (now[0] !== seen[0]) {
      push(nv, pv);
    } else if (now[1] !== seen[1]) {
      push(pv, nv);
    }
    seen = [state(nv), state(pv)];
    showPriorPane();
    requestAnimationFrame(tick);
  }
  let priorPaneState = "";
  function showPriorPane() {
    const now = [...pv.scene.crosshairPos, pv.opts.sliceType, pv.opts.isSliceMM].join(",");
    if (now === priorPaneState) { return; }
    priorPaneState = now;
    const text = window.khe.paneText(pv);
    document.getElementById("prior-slice-mm").textContent = text.where;
    document.getElementById("prior-reformat").textContent = text.reformat;
    document.getElementById("prior-reformat").hidden = !text.reformat;
  }

  // ---- volume on screen now (the case's drawing: proposed, clicked or edited) and its change from T1
  function drawnMl() {
    const bm = nv.drawBitmap;
    if (!bm || !(view.voxel_volume_mm3 > 0)) { return null; }
    let n = 0;
    for (let i = 0; i < bm.length; i++) { if (bm[i]) { n++; } }
    return n * view.voxel_volume_mm3 / 1000;
  }
  function showChange() {
    const now = drawnMl();
    const before = lon.prior.volume_ml;
    let text = now === null ? "" : "volume " + now.toFixed(2) + " mL";
    let change = null;
    if (now !== null && before !== null && before > 0) {
      change = 100 * (now - before) / before;
      text += ", " + (change >= 0 ? "+" : "\u2212") + Math.abs(change).toFixed(1) + " % from T" + lon.prior.timepoint;
    } else if (now !== null && before === 0) {
      text += " (T" + lon.prior.timepoint + " had none: no % change)";
    } else if (now !== null) {
      text += " (T" + lon.prior.timepoint + " has no volume: no % change)";
    }
    document.getElementById("volume-change").textContent = text;
    window.kheCompare.changePercent = change;
  }
  const CHANGE_EVERY_MS = 500;  // the drawing changes by clicks, the pen or a load: counted twice a second
  requestAnimationFrame(tick);
  // Exposed for the end-to-end tests and for debugging from the console.
  window.kheCompare = { prior: pv, ready: true, worldMM: worldMM, mapLevel: mapLevel, changePercent: null,
                        viewCentreWorld: viewCentreWorld };
  showChange();
  setInterval(showChange, CHANGE_EVERY_MS);
  document.body.dataset.compareReady = "1";
})();
