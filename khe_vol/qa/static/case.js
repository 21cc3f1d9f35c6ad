// Case page of the blinded reader app: NiiVue viewer, click segmentation, verdicts (mask editing: edit.js).
// Everything comes from this server (the page's Content-Security-Policy allows nothing else).
(async function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const view = JSON.parse($("case-data").textContent);
  const code = view.case.case_code;
  // Headers of every state-changing request: the app's own, and the session's CSRF token (reading service).
  const csrfMeta = document.querySelector("meta[name='csrf-token']");
  const POST_HEADERS = { "X-Khe-Vol": "reader" };
  if (csrfMeta) { POST_HEADERS["X-CSRF-Token"] = csrfMeta.content; }
  const MASK_OPACITY = 0.5;
  const OVERLAY_COLORMAPS = ["green", "blue", "violet", "warm"];
  const PLANES = ["axial", "coronal", "sagittal"];
  // RAS voxel axis across each plane's slices (NiiVue's dimsRAS order: x = sagittal, y = coronal, z = axial).
  const PLANE_AXIS = { axial: 2, coronal: 1, sagittal: 0 };
  const WINDOW_PRESETS = ["auto", "lesion", "full"];
  const CROSSHAIR_COLOR = [0.2, 0.8, 1.0, 0.7];  // not red: red is the mask
  const CROSSHAIR_WIDTH = 0.3;  // voxels: a thin line, not a bar over the tissue it points at

  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1],
    show3Dcrosshair: true,
    crosshairColor: CROSSHAIR_COLOR,
    crosshairWidth: CROSSHAIR_WIDTH,
    isNearestInterpolation: true,  // voxels as they are, for judging mask edges
    dragAndDropEnabled: false,
    showLegend: false,
    isColorbar: false,
    logLevel: "warn",
    penSize: 1,
    isRadiologicalConvention: !!view.display.radiological,
    // Native plane: slices on the series' own voxel grid; off: resliced along the scanner axes.
    isSliceMM: !$("native-plane").checked,
  });
  // Exposed for the end-to-end tests, for edit.js / compare.js and for debugging from the console.
  // `whenReady` resolves once the image and drawing are loaded.
  let markReady;
  window.khe = {
    nv: nv, view: view, code: code, $: $, MASK_OPACITY: MASK_OPACITY,
    ready: false, editing: false, clicks: [], busy: false, loadError: null,
    whenReady: new Promise(function (resolve) { markReady = resolve; }),
  };

  // ---- loading: every control is off until the image is shown; a failed load says why
  const controls = function () {
    // The mask display boxes stay live: what the reader sets while loading holds once the image shows.
    return document.querySelectorAll(".viewer .tools button, .viewer .tools select, .viewer .tools input:not(.live), "
                                      + "button.verdict, #save-edit");
  };
  function setLoading(loading) {
    document.body.classList.toggle("loading", loading);
    controls().forEach(function (el) {
      if (loading) {
        if (!el.disabled) { el.dataset.offWhileLoading = "1"; el.disabled = true; }
      } else if (el.dataset.offWhileLoading) {
        delete el.dataset.offWhileLoading;
        el.disabled = false;
      }
    });
  }
  controls().forEach(function (el) { el.disabled = true; el.dataset.offWhileLoading = "1"; });
  document.body.classList.add("loading");

  // Let the server do what does not depend on the first click (bias correction of the series, the
  // proposed mask's region and markers) from the moment the page opens, while the image loads and the
  // reader looks; the page says so, as a click meanwhile is answered only once it is done. Failures
  // show at the click.
  window.khe.preparing = true;
  $("prepare-state").textContent = "Preparing click segmentation\u2026 (a click now is answered when it is ready)";
  $("prepare-state").classList.add("running");
  fetch("/api/case/" + code + "/prepare", {
    method: "POST", credentials: "same-origin", headers: POST_HEADERS,
  }).catch(function () {}).finally(function () {
    window.khe.preparing = false;
    $("prepare-state").textContent = "";
    $("prepare-state").classList.remove("running");
    document.body.dataset.prepared = "1";
  });

  // ---- the image takes the screen: the canvas fills the window below the toolbars, sized before
  // NiiVue's first draw (a resize is a full redraw: seconds on a software-rendered first frame)
  const MIN_CANVAS_PX = 320;
  // Only a real change of height (NiiVue's own observer then resizes its drawing buffer: each
  // resize is a full redraw, seconds on a software-rendered first frame).
  function fitCanvas() {
    let changed = false;
    document.querySelectorAll(".canvas-box").forEach(function (box) {
      const top = box.getBoundingClientRect().top + window.scrollY;
      const height = Math.max(MIN_CANVAS_PX, Math.round(window.innerHeight - top - 8));
      if (Math.abs(box.offsetHeight - height) >= 1) { box.style.height = height + "px"; changed = true; }
    });
    // Once an image is shown, its viewers take the new size now (not a frame later): a point on the
    // canvas must mean the same voxel to the code that reads it next (the pen, a click).
    if (changed && nv.volumes.length) {
      nv.resizeListener();
      if (window.kheCompare && window.kheCompare.prior) { window.kheCompare.prior.resizeListener(); }
    }
  }
  window.khe.fitCanvas = fitCanvas;
  window.addEventListener("resize", fitCanvas);
  // A toolbar that grows (a status that wraps, the pen's tools) moves the canvas down: fit it again.
  // Never under a stroke or a drag (the image would move under the pointer): after it.
  let pointerDown = false;
  let fitLater = false;
  $("gl").addEventListener("pointerdown", function () { pointerDown = true; });
  window.addEventListener("pointerup", function () {
    pointerDown = false;
    if (fitLater) { fitLater = false; fitCanvas(); }
  });
  if (window.ResizeObserver) {
    const toolbars = new ResizeObserver(function () { if (pointerDown) { fitLater = true; } else { fitCanvas(); } });
    document.querySelectorAll(".viewer .tools, #edit-tools, nav.steps").forEach(function (el) { toolbars.observe(el); });
  }
  fitCanvas();

  // Fetch a file ourselves, so a failure has an HTTP status to show; NiiVue gets the bytes.
  async function fetchBlobUrl(url, what) {
    let resp;
    try {
      resp = await fetch(url, { credentials: "same-origin" });
    } catch (err) {
      throw new Error(what + " could not be loaded: the server cannot be reached (" + err + ")");
    }
    if (!resp.ok) {
      throw new Error(what + " could not be loaded: HTTP " + resp.status + (resp.statusText ? " " + resp.statusText : ""));
    }
    return URL.createObjectURL(await resp.blob());
  }
  const blobUrls = [];
  try {
    await nv.attachTo("gl");
    const volumes = [{ url: await fetchBlobUrl(view.image_url, "The image"), name: "case.nii.gz" }];
    blobUrls.push(volumes[0].url);
    for (let i = 0; i < view.overlays.length; i++) {
      const o = view.overlays[i];
      if (!o.url) { continue; }
      const url = await fetchBlobUrl(o.url, o.label + "'s mask");
      blobUrls.push(url);
      volumes.push({ url: url, name: "overlay" + i + ".nii.gz", colormap: OVERLAY_COLORMAPS[i % OVERLAY_COLORMAPS.length],
                     opacity: MASK_OPACITY, cal_min: 0.5, cal_max: 1 });
    }
    await nv.loadVolumes(volumes);
    // The drawing layer starts as the reader's own last edit, else the proposed mask.
    const drawingUrl = view.current && view.current.edited_mask_url ? view.current.edited_mask_url
                                                                     : view.proposed_mask_url;
    if (drawingUrl) {
      const url = await fetchBlobUrl(drawingUrl, "The mask");
      blobUrls.push(url);
      if (!(await nv.loadDrawingFromUrl(url, true))) { throw new Error("The mask could not be read by the viewer"); }
    } else {
      nv.createEmptyDrawing();
    }
  } catch (err) {
    window.khe.loadError = String(err.message || err);
    $("load-state").textContent = window.khe.loadError + ". Reload the page; if it persists, tell the coordinator "
      + "(case " + code + ").";
    $("load-state").classList.add("failed");
    document.body.dataset.loadError = "1";
    return;
  } finally {
    blobUrls.forEach(function (u) { URL.revokeObjectURL(u); });
  }

  // ---- mask display: filled or outline, opacity; honours what the reader set while loading
  function maskOpacity() { return Number($("mask-opacity").value); }
  function applyMaskDisplay() {
    const on = $("show-mask").checked;
    const outline = $("outline").checked;
    // Outline: the rim at the chosen opacity, the inside all but transparent (NiiVue draws a rim only
    // where the drawing is visible at all).
    nv.drawRimOpacity = on && outline ? maskOpacity() : -1;
    nv.setDrawOpacity(on ? (outline ? 0.001 : maskOpacity()) : 0);
    document.querySelectorAll(".show-overlay").forEach(function (box) {
      nv.setOpacity(Number(box.dataset.index), box.checked ? maskOpacity() : 0);
    });
    nv.drawScene();
  }
  window.khe.applyMaskDisplay = applyMaskDisplay;
  window.khe.maskOpacity = function () { return $("show-mask").checked ? maskOpacity() : 0; };
  applyMaskDisplay();
  nv.setDrawingEnabled(false);
  // The crosshair starts at the volume's centre, which can lie on a boundary between two slices;
  // on a voxel centre, the slice shown is the slice a click lands in.
  nv.scene.crosshairPos = nv.vox2frac(nv.frac2vox(nv.scene.crosshairPos));

  // ---- open on the lesion: in the plane the series was acquired in (across its thick slices),
  // centred on the mask and zoomed so that it takes about LESION_SHARE of the view.
  const LESION_SHARE = 0.4;
  const MAX_OPEN_ZOOM = 8;
  const SLICE_TYPE_OF_AXIS = [2, 1, 0];  // RAS voxel axis across the slices -> sagittal, coronal, axial
  // RAS voxel axis (of NiiVue's RAS-permuted grid) across the acquired slices: the coarsest
  // spacing; among equal spacings the file's own third (slice) axis.
  function acquisitionAxis(v) {
    const vol = v.volumes[0];
    const spacing = vol.pixDimsRAS.slice(1, 4);
    let axis = vol.permRAS.map(Math.abs).indexOf(3);
    [0, 1, 2].forEach(function (a) { if (spacing[a] > spacing[axis] * 1.01) { axis = a; } });
    return axis;
  }
  // The drawing's lesion in a viewer: {centre, lo, hi} in scanner RAS+ mm (centre: the middle of
  // its box in-plane, on the slice with the most lesion), or null when the drawing is empty.
  function lesionWorld(v) {
    const bm = v.drawBitmap;
    if (!bm) { return null; }
    const d = v.volumes[0].dimsRAS;
    const n = [d[1], d[2], d[3]];
    const lo = n.slice(), hi = [-1, -1, -1];
    const axis = acquisitionAxis(v);
    const perSlice = new Uint32Array(n[axis]);
    let i = 0;
    for (let z = 0; z < n[2]; z++) {
      for (let y = 0; y < n[1]; y++) {
        for (let x = 0; x < n[0]; x++, i++) {
          if (!bm[i]) { continue; }
          const p = [x, y, z];
          for (let a = 0; a < 3; a++) { if (p[a] < lo[a]) { lo[a] = p[a]; } if (p[a] > hi[a]) { hi[a] = p[a]; } }
          perSlice[p[axis]]++;
        }
      }
    }
    if (hi[0] < 0) { return null; }
    const centre = [0, 1, 2].map(function (a) { return (lo[a] + hi[a]) / 2; });
    let best = lo[axis];
    for (let k = lo[axis]; k <= hi[axis]; k++) { if (perSlice[k] > perSlice[best]) { best = k; } }
    centre[axis] = best;
    const world = function (vox) { return Array.from(v.frac2mm(v.vox2frac(vox), 0, true)).slice(0, 3); };
    const corners = [];
    for (let c = 0; c < 8; c++) {
      corners.push(world([0, 1, 2].map(function (a) { return (c >> a) & 1 ? hi[a] + 0.5 : lo[a] - 0.5; })));
    }
    return {
      centre: world(centre),
      lo: [0, 1, 2].map(function (a) { return Math.min.apply(null, corners.map(function (p) { return p[a]; })); }),
      hi: [0, 1, 2].map(function (a) { return Math.max.apply(null, corners.map(function (p) { return p[a]; })); }),
    };
  }
  // Show a viewer in its acquisition plane, centred and zoomed on `lesion` (scanner RAS+ mm; null:
  // the whole slice, centred).
  function showLesion(v, lesion) {
    const axis = acquisitionAxis(v);
    v.setSliceType(SLICE_TYPE_OF_AXIS[axis]);
    if (!lesion) { v.setPan2Dxyzmm([0, 0, 0, 1]); return; }
    const frac = v.mm2frac(lesion.centre, 0, true);
    v.scene.crosshairPos = v.vox2frac(v.frac2vox(frac));
    // NiiVue's display frame (pan and zoom are in it): the volume and the lesion box there.
    const display = function (mm) { return Array.from(v.frac2mm(v.mm2frac(mm, 0, true))).slice(0, 3); };
    const centre = display(lesion.centre);
    const corners = [];
    for (let c = 0; c < 8; c++) {
      corners.push(display([0, 1, 2].map(function (a) { return (c >> a) & 1 ? lesion.hi[a] : lesion.lo[a]; })));
    }
    const volLo = Array.from(v.frac2mm([0, 0, 0])), volHi = Array.from(v.frac2mm([1, 1, 1]));
    const mid = Array.from(v.frac2mm([0.5, 0.5, 0.5])).slice(0, 3);
    let zoom = MAX_OPEN_ZOOM;
    [0, 1, 2].filter(function (a) { return a !== axis; }).forEach(function (a) {
      const extent = Math.max.apply(null, corners.map(function (p) { return p[a]; }))
        - Math.min.apply(null, corners.map(function (p) { return p[a]; }));
      if (extent > 0) { zoom = Math.min(zoom, LESION_SHARE * Math.abs(volHi[a] - volLo[a]) / extent); }
    });
    zoom = Math.max(1, zoom);
    // NiiVue shows (extent - pan) / zoom: this pan puts the lesion's centre in the middle.
    v.setPan2Dxyzmm([mid[0] - zoom * centre[0], mid[1] - zoom * centre[1], mid[2] - zoom * centre[2], zoom]);
  }
  let openLesion = lesionWorld(nv);
  window.khe.lesionWorld = lesionWorld;
  window.khe.showLesion = showLesion;
  window.khe.acquisitionAxis = acquisitionAxis;
  // compare.js: a follow-up with an empty proposal opens on the earlier timepoint's lesion.
  window.khe.setOpenLesion = function (lesion) { openLesion = lesion; showLesion(nv, lesion); showPosition(); };
  window.khe.openLesion = function () { return openLesion; };
  showLesion(nv, openLesion);

  // ---- where we are: slice k / n per plane, RAS+ mm, intensity
  function planesShown() {
    const t = nv.opts.sliceType;
    return t === nv.sliceTypeMultiplanar || t === nv.sliceTypeRender ? PLANES : [PLANES[t]];
  }
  function showPosition() {
    const vox = nv.frac2vox(nv.scene.crosshairPos);
    const dims = nv.volumes[0].dimsRAS;  // [ndim, x, y, z]
    $("slice-info").textContent = planesShown().map(function (p) {
      const a = PLANE_AXIS[p];
      return p + " slice " + (Math.round(vox[a]) + 1) + " / " + dims[a + 1];
    }).join("  |  ");
    const mm = Array.from(nv.frac2mm(nv.scene.crosshairPos, 0, true)).slice(0, 3);
    const value = nv.volumes[0].getValue(Math.round(vox[0]), Math.round(vox[1]), Math.round(vox[2]));
    $("location").textContent = "RAS+ (x, y, z) = (" + mm.map(function (v) { return v.toFixed(1); }).join(", ")
      + ") mm; intensity " + (Number.isFinite(value) ? Number(value.toPrecision(5)) : "n/a");
  }
  window.khe.showPosition = showPosition;
  nv.onLocationChange = showPosition;

  // ---- per pane: where the slice is (scanner mm along its normal) and whether it is a reformat
  // across thick slices (not an acquired slice: partial-volume edges, staircase outlines).
  const REFORMAT_RATIO = 1.5;  // slice thickness / finest in-plane spacing above which reformats are labelled
  const PLANE_LETTER = { axial: "z (S)", coronal: "y (A)", sagittal: "x (R)" };
  function paneText(v) {
    const vol = v.volumes[0];
    const spacing = vol.pixDimsRAS.slice(1, 4);
    const acq = acquisitionAxis(v);
    const thick = spacing[acq] / Math.min.apply(null, spacing) >= REFORMAT_RATIO;
    const t = v.opts.sliceType;
    const planes = t === v.sliceTypeMultiplanar || t === v.sliceTypeRender ? PLANES : [PLANES[t]];
    const mm = Array.from(v.frac2mm(v.scene.crosshairPos, 0, true));
    const where = planes.map(function (p) {
      return p + " " + PLANE_LETTER[p] + " = " + mm[PLANE_AXIS[p]].toFixed(1) + " mm";
    }).join(", ");
    const reformats = thick ? planes.filter(function (p) { return PLANE_AXIS[p] !== acq; }) : [];
    return {
      where: where,
      reformat: reformats.length ? (reformats.join(" and ") + ": reformat across " + spacing[acq].toFixed(1)
        + " mm slices (not an acquired slice)") : "",
    };
  }
  window.khe.paneText = paneText;
  function showPane() {
    const text = paneText(nv);
    $("slice-mm").textContent = text.where;
    $("reformat").textContent = text.reformat;
    $("reformat").hidden = !text.reformat;
    showMarkers();
  }

  // ---- the clicks, marked on the slices they lie on (+ include, - exclude)
  function showMarkers() {
    const box = $("click-markers");
    box.replaceChildren();
    const list = window.khe.clicks || [];
    if (!list.length || !nv.volumes.length) { return; }
    const dpr = window.devicePixelRatio || 1;
    const here = nv.frac2vox(nv.scene.crosshairPos);
    const t = nv.opts.sliceType;
    const types = t === nv.sliceTypeMultiplanar ? [0, 1, 2] : (t <= 2 ? [t] : []);
    list.forEach(function (c, n) {
      if (c.kind === "box") { return; }
      const frac = nv.mm2frac(c.ras_mm, 0, true);
      const vox = nv.frac2vox(frac);
      types.forEach(function (type) {
        const axis = PLANE_AXIS[PLANES[type]];
        if (Math.abs(vox[axis] - here[axis]) > 0.5) { return; }  // not on the slice shown
        const at = nv.frac2canvasPosWithTile(frac, type);
        if (!at || !at.pos) { return; }
        const m = document.createElement("span");
        m.className = "click-marker " + c.kind;
        m.textContent = c.kind === "include" ? "+" : "\u2212";
        m.title = c.kind + " click " + (n + 1);
        m.dataset.n = String(n + 1);
        m.style.left = ($("gl").offsetLeft + at.pos[0] / dpr) + "px";
        m.style.top = ($("gl").offsetTop + at.pos[1] / dpr) + "px";
        box.appendChild(m);
      });
    });
  }
  window.khe.showMarkers = showMarkers;
  // The view changes by zoom, pan, slice or view type: the pane text and markers follow, each frame.
  let paneState = "";
  (function watchPane() {
    if (nv.volumes.length) {
      const now = [...nv.scene.crosshairPos, ...nv.scene.pan2Dxyzmm, nv.opts.sliceType, nv.opts.isSliceMM,
                   nv.canvas ? nv.canvas.width + "x" + nv.canvas.height : "", JSON.stringify(window.khe.clicks)].join(",");
      if (now !== paneState) { paneState = now; showPane(); }
    }
    requestAnimationFrame(watchPane);
  })();

  // ---- ruler: NiiVue's distance measurement (left drag while on); the length is also said here
  let rulerOn = false;
  function setRuler(on) {
    rulerOn = on;
    window.khe.rulerOn = on;
    $("ruler").setAttribute("aria-pressed", on ? "true" : "false");
    nv.opts.dragModePrimary = on ? nv.dragModes.measurement : nv.dragModes.crosshair;
    if (on) {
      $("ruler-length").textContent = "drag on a slice to measure";
    } else {
      nv.clearMeasurements();  // the lines go with the tool; the last length stays written
      nv.drawScene();
    }
  }
  nv.onMeasurementCompleted = function (m) {
    window.khe.lastMeasurementMm = m.distance;
    $("ruler-length").textContent = "ruler: " + m.distance.toFixed(1) + " mm";
  };
  $("ruler").addEventListener("click", function () { setRuler(!rulerOn); });
  window.khe.setRuler = setRuler;

  // ---- window / level: presets from the server's robust percentiles, numbers, right drag
  const windows = (view.image_info && view.image_info.windows) || null;
  function showWindowNumbers() {
    const v = nv.volumes[0];
    $("win-width").value = Number((v.cal_max - v.cal_min).toPrecision(5));
    $("win-level").value = Number(((v.cal_max + v.cal_min) / 2).toPrecision(5));
  }
  function setWindow(low, high) {
    if (!(Number.isFinite(low) && Number.isFinite(high) && high > low)) { return false; }
    nv.volumes[0].cal_min = low;
    nv.volumes[0].cal_max = high;
    nv.updateGLVolume();
    showWindowNumbers();
    return true;
  }
  function setPreset(name) {
    const w = windows ? windows[name] : null;
    if (w) {
      setWindow(w[0], w[1]);
    } else if (name === "full") {
      setWindow(nv.volumes[0].global_min, nv.volumes[0].global_max);
    } else {
      setWindow(nv.volumes[0].robust_min, nv.volumes[0].robust_max);
    }
    $("window-preset").value = name;
  }
  window.khe.setPreset = setPreset;
  $("window-preset").addEventListener("change", function (e) { setPreset(e.target.value); });
  function windowFromNumbers() {
    const width = Number($("win-width").value);
    const level = Number($("win-level").value);
    if (setWindow(level - width / 2, level + width / 2)) { $("window-preset").value = "custom"; }
  }
  $("win-width").addEventListener("change", windowFromNumbers);
  $("win-level").addEventListener("change", windowFromNumbers);
  nv.onIntensityChange = function () { showWindowNumbers(); $("window-preset").value = "custom"; };

  // ---- view controls
  function resetView() {
    showLesion(nv, openLesion);  // as the case opened: on the lesion, in the acquisition plane
    setPreset("auto");
    showPosition();
  }
  window.khe.resetView = resetView;
  document.querySelectorAll("button[data-slice]").forEach(function (b) {
    b.addEventListener("click", function () { nv.setSliceType(Number(b.dataset.slice)); showPosition(); });
  });
  function zoomBy(factor) {
    const p = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.max(0.25, Math.min(16, p[3] * factor))]);
  }
  $("zoom-in").addEventListener("click", function () { zoomBy(1.25); });
  $("zoom-out").addEventListener("click", function () { zoomBy(0.8); });
  $("zoom-reset").addEventListener("click", resetView);
  $("show-mask").addEventListener("change", applyMaskDisplay);
  $("outline").addEventListener("change", applyMaskDisplay);
  $("mask-opacity").addEventListener("input", applyMaskDisplay);
  document.querySelectorAll(".show-overlay").forEach(function (box) { box.addEventListener("change", applyMaskDisplay); });
  $("show-crosshair").addEventListener("change", function (e) {
    nv.setCrosshairWidth(e.target.checked ? CROSSHAIR_WIDTH : 0);
    nv.setCrosshairColor(e.target.checked ? CROSSHAIR_COLOR : [0, 0, 0, 0]);
  });
  $("radiological").addEventListener("change", function (e) { nv.setRadiologicalConvention(e.target.checked); });
  $("native-plane").addEventListener("change", function (e) { nv.setSliceMM(!e.target.checked); nv.drawScene(); });
  // One slice (or `step`) along the current plane's axis; multiplanar moves the axial slice.
  function moveSlice(step) {
    const plane = planesShown().length === 1 ? planesShown()[0] : "axial";
    const d = [0, 0, 0];
    d[PLANE_AXIS[plane]] = step;
    nv.moveCrosshairInVox(d[0], d[1], d[2]);
    showPosition();
  }
  window.khe.moveSlice = moveSlice;
  setPreset("auto");
  showPosition();
  nv.drawScene();

  // ---- verdicts: one revision per page state, then on to the next unread case
  let revision = view.revision;  // the case's latest revision as this page shows it (0: unread)
  let nextUnread = view.next_unread;
  let saving = false;
  let savedClicks = view.current && view.current.clicks ? view.current.clicks.slice() : [];
  function render(data) {
    const cur = data.current;
    let text = "Not read yet";
    if (cur) {
      text = "Current: " + cur.verdict_label + " (revision " + cur.revision + ")";
      if (cur.edited_volume_ml !== null) { text += ", edited volume " + cur.edited_volume_ml.toFixed(2) + " mL"; }
    }
    $("status").textContent = text;
    $("status").className = "status " + data.state;
    const list = $("history");
    list.replaceChildren();
    data.history.forEach(function (r) {
      const li = document.createElement("li");
      let t = "revision " + r.revision + ": " + r.verdict_label;
      if (r.edited_volume_ml !== null) { t += " (" + r.edited_volume_ml.toFixed(2) + " mL)"; }
      if (r.comment) { t += ": " + r.comment; }
      li.textContent = t;
      list.appendChild(li);
    });
    $("edited-volume").textContent = cur && cur.edited_volume_ml !== null
      ? "Edited volume: " + cur.edited_volume_ml.toFixed(2) + " mL" : "";
    revision = data.revision;
    nextUnread = data.next_unread;
    const link = $("next-unread");
    if (nextUnread) {
      if (link.tagName !== "A") {
        const a = document.createElement("a");
        a.id = "next-unread";
        link.replaceWith(a);
      }
      $("next-unread").href = "/case/" + nextUnread;
      $("next-unread").textContent = "next unread \u00bb";
      $("next-unread").className = "";
    } else {
      link.removeAttribute("href");
      link.textContent = "no unread case left";
      link.className = "off";
    }
  }
  function commentTooLong() {
    const n = $("comment").value.length;
    $("comment-count").textContent = n + " / " + view.comment_max_chars + " characters";
    $("comment-count").classList.toggle("over", n > view.comment_max_chars);
    return n > view.comment_max_chars;
  }
  $("comment").addEventListener("input", commentTooLong);
  function setSaving(on) {
    saving = on;
    window.khe.saving = on;
    document.querySelectorAll("button.verdict, #save-edit").forEach(function (b) {
      if (on) { b.dataset.offWhileSaving = b.disabled ? "" : "1"; b.disabled = true; }
      else if (b.dataset.offWhileSaving) { b.disabled = false; delete b.dataset.offWhileSaving; }
      else { delete b.dataset.offWhileSaving; }
    });
  }
  // Resolves true once the server has stored the read (edit.js saves through it too).
  window.khe.submit = submit;
  let goNextAfterSave = false;  // the reader pressed "Sign and next" in the signature dialog
  async function postRead(form) {
    $("error").textContent = "saving...";
    let resp;
    try {
      resp = await fetch("/api/case/" + code + "/read", {
        method: "POST", body: form, credentials: "same-origin", headers: POST_HEADERS,
      });
    } catch (err) {
      return { status: 0, data: { error: "the server cannot be reached (" + err + ")" } };
    }
    const data = await resp.json().catch(function () { return { error: "HTTP " + resp.status }; });
    return { status: resp.status, data: data };
  }
  async function submit(verdict, maskBytes, clickList) {
    if (saving) { return false; }  // a second click while the first is on its way: ignored
    if (commentTooLong()) {
      $("error").textContent = "Not saved: the comment has " + $("comment").value.length + " characters; at most "
        + view.comment_max_chars + " are kept. Shorten it.";
      return false;
    }
    const form = new FormData();
    form.append("verdict", verdict);
    form.append("comment", $("comment").value);
    form.append("expected_revision", String(revision));
    if (clickList) {
      form.append("clicks", JSON.stringify(clickList));
    } else if (maskBytes) {
      form.append("mask", new Blob([maskBytes], { type: "application/octet-stream" }), "drawing.nii");
    }
    if (window.kheReadTime) { window.kheReadTime.addTo(form, verdict); }  // time per read (readtime.js)
    setSaving(true);
    goNextAfterSave = false;
    try {
      let answer;
      if ($("sign-dialog")) {
        // The reading service: a verdict is an electronic signature (password again; a reason to revise).
        // The dialog stays open, with what the reader typed, until the server accepts the signature.
        answer = await askSignature(verdict, function (signature) {
          const signed = new FormData();
          form.forEach(function (value, key) { signed.append(key, value); });
          signed.append("password", signature.password);
          if (signature.reason) { signed.append("reason", signature.reason); }
          return postRead(signed);
        });
        if (!answer) {
          $("error").textContent = "Not saved: not signed.";
          return false;
        }
      } else {
        answer = await postRead(form);
      }
      const data = answer.data;
      if (answer.status === 409 && data.view) {
        render(data.view);  // saved meanwhile (another window): show what is stored
        $("error").textContent = "Not saved again: " + data.error;
        return false;
      }
      if (answer.status !== 200) {
        $("error").textContent = "Not saved: " + data.error;
        return false;
      }
      if (window.kheReadTime) { window.kheReadTime.saved(); }
      $("error").textContent = "Saved.";
      savedClicks = clicks.slice();  // the reader decided: clicks left unsaved were chosen to be dropped
      render(data);
      return true;
    } finally {
      setSaving(false);
    }
  }
  // Shows the signature dialog; `attempt({password, reason})` posts the read. Resolves the
  // server's answer once it is not a refused signature with tries left (a wrong password keeps the
  // dialog open, the reason kept and the tries left shown), or null when the reader cancels.
  function askSignature(verdict, attempt) {
    const dialog = $("sign-dialog");
    const revising = revision > 0;
    const button = document.querySelector("button.verdict[data-verdict='" + verdict + "']");
    $("sign-verdict").textContent = button ? button.textContent : verdict;
    $("sign-reason-row").hidden = !revising;
    $("sign-password").value = "";
    $("sign-error").textContent = "";
    $("sign-next").hidden = !nextUnread;
    let busy = false;
    return new Promise(function (resolve) {
      function done(result) {
        $("sign-form").removeEventListener("submit", onSign);
        $("sign-next").removeEventListener("click", onSignNext);
        $("sign-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) { dialog.close(); }
        resolve(result);
      }
      async function trySign(next) {
        if (busy) { return; }
        const reason = $("sign-reason").value.trim();
        if (revising && !reason) { $("sign-error").textContent = "Say why the verdict changes."; return; }
        if (!$("sign-password").value) { $("sign-error").textContent = "Enter your password to sign."; return; }
        const signature = { password: $("sign-password").value, reason: revising ? reason : "" };
        $("sign-password").value = "";
        busy = true;
        $("sign-error").textContent = "signing...";
        $("sign-confirm").disabled = $("sign-next").disabled = true;
        let answer;
        try {
          answer = await attempt(signature);
        } finally {
          busy = false;
          $("sign-confirm").disabled = $("sign-next").disabled = false;
        }
        if (answer.status === 403 && answer.data.signing && answer.data.tries_left > 0) {
          $("sign-error").textContent = answer.data.error;  // says how many tries are left
          $("error").textContent = "Not saved yet: " + answer.data.error;
          $("sign-password").focus();
          return;
        }
        if (revising && answer.status === 200) { $("sign-reason").value = ""; }
        goNextAfterSave = next && answer.status === 200;
        done(answer);
      }
      function onSign(e) { e.preventDefault(); trySign(false); }
      function onSignNext(e) { e.preventDefault(); trySign(true); }
      function onCancel(e) { e.preventDefault(); if (!busy) { done(null); } }
      $("sign-form").addEventListener("submit", onSign);
      $("sign-next").addEventListener("click", onSignNext);
      $("sign-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      (revising ? $("sign-reason") : $("sign-password")).focus();
    });
  }
  function afterVerdict() {
    const next = goNextAfterSave || $("auto-advance").checked;
    goNextAfterSave = false;
    if (next && nextUnread) {
      $("error").textContent = "Saved. Opening the next unread case...";
      go("/case/" + nextUnread);
    } else if (next) {
      $("error").textContent = "Saved. Every case is read: the worklist is at the top left.";
    }
  }
  async function verdict(name) {
    if (saving || !window.khe.ready) { return; }
    const b = document.querySelector("button.verdict[data-verdict='" + name + "']");
    if (!b || b.disabled) { return; }
    if (name === "edited") {
      if (!window.khe.editing) { window.khe.startEditing(); }  // edit.js
      return;
    }
    if (name === "accept" && clicks.length) {
      // Accepting the mask the clicks made: an Edited read, whose mask the server recomputes.
      await pending;
      if (!shown.length) { $("error").textContent = "Not saved: no click has made a mask yet"; return; }
      if (await submit("edited", null, shown)) { afterVerdict(); }
      return;
    }
    if (await submit(name, null)) { afterVerdict(); }
  }
  window.khe.verdict = verdict;
  document.querySelectorAll("button.verdict").forEach(function (b) {
    b.addEventListener("click", function () { verdict(b.dataset.verdict); });
  });

  // ---- leaving: never lose an unsaved edit or unsaved clicks without a word
  const autoAdvanceKey = "khe-vol.autoAdvance";
  try {
    if (window.localStorage.getItem(autoAdvanceKey) === "0") { $("auto-advance").checked = false; }
  } catch (err) { /* storage off: the default holds */ }
  $("auto-advance").addEventListener("change", function (e) {
    try { window.localStorage.setItem(autoAdvanceKey, e.target.checked ? "1" : "0"); } catch (err) { /* ignore */ }
  });
  function sameClicks(a, b) { return JSON.stringify(a || []) === JSON.stringify(b || []); }
  function hasUnsaved() {
    return window.khe.hasUnsavedEdits() || !sameClicks(clicks, savedClicks);  // edit.js: the pen
  }
  window.khe.hasUnsaved = hasUnsaved;
  let leaving = false;
  function go(url) {
    if (hasUnsaved() && !window.confirm("This case has an edit or clicks that are not saved. Leave and lose them?")) {
      return false;
    }
    leaving = true;
    window.location.href = url;
    return true;
  }
  window.khe.go = go;
  window.addEventListener("beforeunload", function (e) {
    if (!leaving && hasUnsaved()) { e.preventDefault(); e.returnValue = ""; }
  });
  // In-app links (worklist, previous, next, next unread; some are re-rendered): one delegated handler.
  document.addEventListener("click", function (e) {
    const a = e.target.closest ? e.target.closest("a[href]") : null;
    if (!a || e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey) { return; }
    e.preventDefault();
    go(a.getAttribute("href"));
  });

  // ---- click segmentation: include / exclude clicks, the server draws the mask
  const canvas = $("gl");
  const acceptButton = document.querySelector("button.verdict[data-verdict='accept']");
  const acceptLabel = acceptButton ? acceptButton.textContent : "";
  let clicks = view.current && view.current.clicks ? view.current.clicks.slice() : [];
  let shown = clicks.slice();  // the clicks whose mask is on screen
  let redo = [];
  let excludeByDefault = false;  // key E: plain click excludes, Shift+click includes
  let pending = Promise.resolve();
  let latest = 0;

  function fmt(v) { return v.toFixed(1); }
  function renderClicks(volumeMl) {
    window.khe.clicks = shown.slice();
    const list = $("click-list");
    list.replaceChildren();
    shown.forEach(function (c, i) {
      const li = document.createElement("li");
      li.className = c.kind;
      const box = c.kind === "box";
      li.textContent = box ? "box from (" + c.ras_mm.slice(0, 3).map(fmt).join(", ") + ") to ("
        + c.ras_mm.slice(3).map(fmt).join(", ") + ") mm" : c.kind + " at (" + c.ras_mm.map(fmt).join(", ") + ") mm";
      li.title = box ? "show the box's centre" : "show this click";
      const at = box ? [0, 1, 2].map(function (i) { return (c.ras_mm[i] + c.ras_mm[i + 3]) / 2; }) : c.ras_mm;
      li.addEventListener("click", function () {
        nv.scene.crosshairPos = nv.mm2frac(at, 0, true);
        nv.drawScene();
      });
      list.appendChild(li);
    });
    if (volumeMl !== undefined) {
      $("click-volume").textContent = shown.length
        ? volumeMl.toFixed(2) + " mL (" + shown.length + " click" + (shown.length > 1 ? "s" : "") + ")"
        : "no clicks";
    } else if (!shown.length) {
      $("click-volume").textContent = "no clicks";
    }
    $("click-undo").disabled = !clicks.length;
    $("click-redo").disabled = !redo.length;
    $("click-clear").disabled = !clicks.length;
    if ($("seed-prompt")) { $("seed-prompt").hidden = shown.length > 0; }
    if (acceptButton) {
      acceptButton.textContent = clicks.length ? "Accept clicked mask" : acceptLabel;
      acceptButton.disabled = view.needs_seed && !clicks.length;
      acceptButton.title = acceptButton.disabled ? "no mask to accept yet: click inside the lesion" : "";
    }
  }

  // Ask the server for the mask of `list`; requests run one at a time, and only the newest is shown.
  function requestMask(list) {
    const mine = ++latest;
    pending = pending.then(async function () {
      if (mine !== latest) { return; }  // a newer list is on its way
      window.khe.busy = true;
      $("click-busy").textContent = window.khe.preparing ? "segmenting (after the preparation)..." : "segmenting...";
      try {
        if (!list.length && view.needs_seed) {
          $("air-warning").hidden = true;
          nv.createEmptyDrawing();
          applyMaskDisplay();
          shown = [];
          renderClicks();
          $("error").textContent = "";
          return;
        }
        let resp;
        try {
          resp = await fetch("/api/case/" + code + "/segment", {
            method: "POST", credentials: "same-origin", body: JSON.stringify({ clicks: list }),
            headers: Object.assign({ "Content-Type": "application/json" }, POST_HEADERS),
          });
        } catch (err) {
          throw new Error("the server cannot be reached (" + err + ")");
        }
        if (!resp.ok) {
          const data = await resp.json().catch(function () { return { error: "HTTP " + resp.status }; });
          throw new Error(data.error);
        }
        const volumeMl = Number(resp.headers.get("X-Volume-Ml"));
        const warning = resp.headers.get("X-Click-Warning");
        $("air-warning").textContent = warning ? "Warning: " + warning + "." : "";
        $("air-warning").hidden = !warning;
        const blobUrl = URL.createObjectURL(await resp.blob());
        try {
          await nv.loadDrawingFromUrl(blobUrl, true);
        } finally {
          URL.revokeObjectURL(blobUrl);
        }
        applyMaskDisplay();
        shown = list.slice();
        if (mine === latest) { clicks = list.slice(); }
        renderClicks(volumeMl);
        $("error").textContent = "";
      } catch (err) {
        // The click is dropped: the list stays the one whose mask is on screen.
        clicks = shown.slice();
        renderClicks();
        $("error").textContent = "Click not used: " + err.message;
      } finally {
        window.khe.busy = mine !== latest;
        $("click-busy").textContent = window.khe.busy ? "segmenting..." : "";
      }
    });
    return pending;
  }
  window.khe.settled = function () { return pending; };
  // A pen drawing cannot be recomputed from clicks: edit.js drops them when editing starts.
  window.khe.dropClicks = function () {
    clicks = []; shown = []; redo = [];
    renderClicks();
    $("click-mode").checked = false;
  };

  function setClicks(list) {
    clicks = list;
    renderClicks();
    return requestMask(list.slice());
  }
  function addClick(kind, mm) {
    redo = [];
    return setClicks(clicks.concat([{ kind: kind, ras_mm: mm }]));
  }
  function undoClick() {
    if (!clicks.length) { return; }
    redo.push(clicks[clicks.length - 1]);
    setClicks(clicks.slice(0, -1));
  }
  function redoClick() {
    if (!redo.length) { return; }
    setClicks(clicks.concat([redo.pop()]));
  }
  function setKind(exclude) {
    excludeByDefault = exclude;
    const b = $("click-kind");
    b.className = exclude ? "exclude" : "include";
    b.textContent = exclude ? "plain click: exclude (Shift+click includes; key E swaps)"
                            : "plain click: include (key E swaps)";
  }

  // A click is a press and release of the left button without a drag (a drag pans, zooms or windows).
  let down = null;
  canvas.addEventListener("pointerdown", function (e) {
    // Where the pointer went down on the image: the page may scroll or reflow before it comes up
    // (focus, a prompt that goes), so the point is kept relative to the canvas now.
    const rect = canvas.getBoundingClientRect();
    down = e.button === 0 ? { x: e.clientX - rect.left, y: e.clientY - rect.top, cx: e.clientX, cy: e.clientY } : null;
  });
  canvas.addEventListener("pointerup", function (e) {
    const start = down;
    down = null;
    if (!start || e.button !== 0 || !$("click-mode").checked || window.khe.editing || boxMode || window.khe.rulerOn) {
      return;
    }
    if (Math.hypot(e.clientX - start.cx, e.clientY - start.cy) > 4) { return; }  // a drag, not a click
    const dpr = window.devicePixelRatio || 1;
    const frac = nv.canvasPos2frac([start.x * dpr, start.y * dpr]);
    if (!(frac[0] >= 0 && frac[0] <= 1 && frac[1] >= 0 && frac[1] <= 1 && frac[2] >= 0 && frac[2] <= 1)) {
      $("error").textContent = "Click not used: click on a slice of the image";
      return;
    }
    // The clicked voxel's centre in scanner RAS+ mm: NiiVue's true voxel-to-world transform
    // (the NIfTI sform, else qform; isForceSliceMM: not the de-obliqued display frame).
    const centre = nv.vox2frac(nv.frac2vox(frac));
    const mm = Array.from(nv.frac2mm(centre, 0, true)).slice(0, 3);
    const exclude = excludeByDefault !== e.shiftKey;
    addClick(exclude ? "exclude" : "include", mm);
  });

  // ---- box: a rectangle dragged on a slice, and its first and last slice; the learned engine
  // outlines the lesion inside it. It is the first interaction of the click list (a box starts over).
  let boxMode = false;
  let boxDown = null;
  let boxDraft = null;  // {a, b: the dragged corners (RAS+ mm), axis: the slices' normal, lo, hi: its range (mm)}
  function setBoxMode(on) {
    boxMode = on;
    $("box-mode").setAttribute("aria-pressed", on ? "true" : "false");
  }
  function canvasPoint(e) {
    const rect = canvas.getBoundingClientRect();
    return { x: e.clientX - rect.left, y: e.clientY - rect.top };
  }
  function pointMm(p) {
    const dpr = window.devicePixelRatio || 1;
    const frac = nv.canvasPos2frac([p.x * dpr, p.y * dpr]);
    if (!(frac[0] >= 0 && frac[0] <= 1 && frac[1] >= 0 && frac[1] <= 1 && frac[2] >= 0 && frac[2] <= 1)) { return null; }
    return Array.from(nv.frac2mm(frac, 0, true)).slice(0, 3);
  }
  function showRubber(a, b) {
    const r = $("box-rubber");
    r.hidden = !a;
    if (!a) { return; }
    const offset = [canvas.offsetLeft, canvas.offsetTop];
    r.style.left = (offset[0] + Math.min(a.x, b.x)) + "px";
    r.style.top = (offset[1] + Math.min(a.y, b.y)) + "px";
    r.style.width = Math.abs(a.x - b.x) + "px";
    r.style.height = Math.abs(a.y - b.y) + "px";
  }
  function boxCorners() {
    const lo = [0, 1, 2].map(function (i) { return Math.min(boxDraft.a[i], boxDraft.b[i]); });
    const hi = [0, 1, 2].map(function (i) { return Math.max(boxDraft.a[i], boxDraft.b[i]); });
    lo[boxDraft.axis] = Math.min(boxDraft.lo, boxDraft.hi);
    hi[boxDraft.axis] = Math.max(boxDraft.lo, boxDraft.hi);
    return lo.concat(hi);
  }
  function sendBox() {
    const corners = boxCorners();
    const names = ["x", "y", "z"];
    $("box-state").textContent = "slices " + names[boxDraft.axis] + " " + fmt(corners[boxDraft.axis]) + " to "
      + fmt(corners[boxDraft.axis + 3]) + " mm";
    $("box-first").disabled = false;
    $("box-last").disabled = false;
    redo = [];
    return setClicks([{ kind: "box", ras_mm: corners }]);
  }
  canvas.addEventListener("pointerdown", function (e) {
    if (!boxMode || e.button !== 0 || window.khe.editing) { return; }
    boxDown = canvasPoint(e);
  });
  canvas.addEventListener("pointermove", function (e) {
    if (boxDown) { showRubber(boxDown, canvasPoint(e)); }
  });
  canvas.addEventListener("pointerup", function (e) {
    const start = boxDown;
    boxDown = null;
    showRubber(null);
    if (!start) { return; }
    const end = canvasPoint(e);
    if (Math.hypot(end.x - start.x, end.y - start.y) <= 4) { return; }  // a click, not a box
    const a = pointMm(start);
    const b = pointMm(end);
    if (!a || !b) { $("error").textContent = "Box not used: drag it on a slice of the image"; return; }
    // Both corners lie on the slice shown: its normal is the scanner axis along which they agree.
    const spread = [0, 1, 2].map(function (i) { return Math.abs(a[i] - b[i]); });
    const axis = spread.indexOf(Math.min.apply(null, spread));
    const inPlane = [0, 1, 2].filter(function (i) { return i !== axis; }).map(function (i) { return spread[i]; });
    // Until the reader sets them, the first and last slice lie half the box's narrower side away.
    const half = Math.min.apply(null, inPlane) / 2;
    boxDraft = { a: a, b: b, axis: axis, lo: a[axis] - half, hi: a[axis] + half };
    setBoxMode(false);
    sendBox();
  });
  function setBoxEnd(which) {
    if (!boxDraft) { return; }
    const mm = Array.from(nv.frac2mm(nv.scene.crosshairPos, 0, true));
    boxDraft[which] = mm[boxDraft.axis];
    sendBox();
  }
  $("box-mode").addEventListener("click", function () { setBoxMode(!boxMode); });
  $("box-first").addEventListener("click", function () { setBoxEnd("lo"); });
  $("box-last").addEventListener("click", function () { setBoxEnd("hi"); });

  $("click-kind").addEventListener("click", function () { setKind(!excludeByDefault); });
  $("click-undo").addEventListener("click", undoClick);
  $("click-redo").addEventListener("click", redoClick);
  $("click-clear").addEventListener("click", function () {
    if (!clicks.length) { return; }
    redo = clicks.slice().reverse();  // Redo brings them back one by one
    setClicks([]);
  });
  // ---- keyboard: everything a read needs, without first clicking the image; never while typing
  function typing(target) {
    if (!target || !target.tagName) { return false; }
    if (target.isContentEditable || target.tagName === "TEXTAREA" || target.tagName === "SELECT") { return true; }
    return target.tagName === "INPUT" && !["checkbox", "radio", "range", "button"].includes(target.type);
  }
  function toggle(id) {
    const box = $(id);
    if (box.disabled) { return; }
    box.checked = !box.checked;
    box.dispatchEvent(new Event("change"));
  }
  function cyclePreset() {
    const at = WINDOW_PRESETS.indexOf($("window-preset").value);
    setPreset(WINDOW_PRESETS[(at + 1) % WINDOW_PRESETS.length]);
  }
  function link(id) {
    const a = $(id);
    if (a && a.tagName === "A" && a.getAttribute("href")) { go(a.getAttribute("href")); }
  }
  const VERDICT_BY_KEY = {};
  document.querySelectorAll("button.verdict").forEach(function (b) { VERDICT_BY_KEY[b.dataset.key.toLowerCase()] = b.dataset.verdict; });
  const PLAIN_KEYS = {
    n: function () { link("next"); }, p: function () { link("prev"); }, u: function () { link("next-unread"); },
    m: function () { toggle("show-mask"); }, o: function () { toggle("outline"); }, x: function () { toggle("show-crosshair"); },
    w: cyclePreset, e: function () { setKind(!excludeByDefault); },
    t: function () { if (!$("ruler").disabled) { window.khe.setRuler(!window.khe.rulerOn); } },
    c: function () { $("click-mode").checked = !$("click-mode").checked; },
    "1": function () { nv.setSliceType(0); showPosition(); }, "2": function () { nv.setSliceType(1); showPosition(); },
    "3": function () { nv.setSliceType(2); showPosition(); }, "4": function () { nv.setSliceType(3); showPosition(); },
    home: resetView,
    arrowup: function () { moveSlice(1); }, arrowright: function () { moveSlice(1); },
    arrowdown: function () { moveSlice(-1); }, arrowleft: function () { moveSlice(-1); },
    pageup: function () { moveSlice(5); }, pagedown: function () { moveSlice(-5); },
  };
  // The pen's keys (edit.js): no other key of the page means anything else with them.
  const EDIT_KEYS = ["b", "g", "f", "s", "i", "[", "]", "escape"];
  function onKey(e) {
    if ($("sign-dialog") && $("sign-dialog").open) { return; }  // the dialog's own keys (Enter signs, Esc cancels)
    if (typing(e.target)) {
      if (e.type === "keydown" && e.key === "Escape") { e.target.blur(); }
      return;
    }
    const key = e.key.toLowerCase();
    // A focused slider keeps its own keys (arrows, Page, Home/End move it), as everywhere on the web.
    if (e.target && e.target.type === "range" && /^(arrow|page|home|end)/.test(key)) { return; }
    // While editing, Ctrl keys and the pen's own keys are edit.js's (the active tool's history).
    if (window.khe.editing && (e.ctrlKey || e.metaKey || EDIT_KEYS.includes(key))) { return; }
    let action = null;
    if ((e.ctrlKey || e.metaKey) && key === "z" && !e.shiftKey) {
      action = undoClick;
    } else if ((e.ctrlKey || e.metaKey) && (key === "y" || (key === "z" && e.shiftKey))) {
      action = redoClick;
    } else if (!e.ctrlKey && !e.metaKey && !e.altKey) {
      if (VERDICT_BY_KEY[key]) {
        const name = VERDICT_BY_KEY[key];
        action = function () { verdict(name); };
      } else if (PLAIN_KEYS[key]) {
        action = PLAIN_KEYS[key];
      }
    }
    if (!action) { return; }
    // Ours, not NiiVue's (its canvas keys would also act on M, C, arrows) nor the page's scroll.
    e.preventDefault();
    e.stopPropagation();
    if (e.type !== "keydown" || !window.khe.ready || e.repeat && !key.startsWith("arrow") && !key.startsWith("page")) {
      return;
    }
    action();
  }
  window.addEventListener("keydown", onKey, true);
  window.addEventListener("keyup", onKey, true);
  setLoading(false);
  renderClicks(view.current && view.current.clicks ? view.current.edited_volume_ml : undefined);


  $("load-state").hidden = true;
  window.khe.ready = true;
  markReady();
  document.body.dataset.ready = "1";
})();
