// Case page of the blinded reader app: NiiVue viewer, mask editing, verdicts.
// Everything comes from this server (the page's Content-Security-Policy allows nothing else).
(async function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const view = JSON.parse($("case-data").textContent);
  const code = view.case.case_code;
  const MASK_OPACITY = 0.5;
  const OVERLAY_COLORMAPS = ["green", "blue", "violet", "warm"];

  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1],
    show3Dcrosshair: true,
    crosshairColor: [0.2, 0.8, 1.0, 0.7],  // not red: red is the mask
    isNearestInterpolation: true,  // voxels as they are, for judging mask edges
    dragAndDropEnabled: false,
    showLegend: false,
    isColorbar: false,
    logLevel: "warn",
    penSize: 1,
  });
  // Exposed for the end-to-end tests and for debugging from the console.
  window.khe = { nv: nv, ready: false, editing: false };
  await nv.attachTo("gl");

  const volumes = [{ url: view.image_url }];
  view.overlays.forEach(function (o, i) {
    if (o.url) {
      volumes.push({ url: o.url, colormap: OVERLAY_COLORMAPS[i % OVERLAY_COLORMAPS.length],
                     opacity: MASK_OPACITY, cal_min: 0.5, cal_max: 1 });
    }
  });
  await nv.loadVolumes(volumes);
  // The drawing layer starts as the reader's own last edit, else the proposed mask.
  const drawingUrl = view.current && view.current.edited_mask_url ? view.current.edited_mask_url
                                                                   : view.proposed_mask_url;
  if (drawingUrl) {
    await nv.loadDrawingFromUrl(drawingUrl, true);
  } else {
    nv.createEmptyDrawing();
  }
  nv.setDrawOpacity(MASK_OPACITY);
  nv.setDrawingEnabled(false);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  nv.onLocationChange = function (data) { $("location").textContent = data.string || ""; };

  // ---- view controls
  document.querySelectorAll("button[data-slice]").forEach(function (b) {
    b.addEventListener("click", function () { nv.setSliceType(Number(b.dataset.slice)); });
  });
  function zoomBy(factor) {
    const p = nv.scene.pan2Dxyzmm;
    nv.setPan2Dxyzmm([p[0], p[1], p[2], Math.max(0.25, Math.min(16, p[3] * factor))]);
  }
  $("zoom-in").addEventListener("click", function () { zoomBy(1.25); });
  $("zoom-out").addEventListener("click", function () { zoomBy(0.8); });
  $("zoom-reset").addEventListener("click", function () { nv.setPan2Dxyzmm([0, 0, 0, 1]); });
  $("show-mask").addEventListener("change", function (e) {
    nv.setDrawOpacity(e.target.checked ? MASK_OPACITY : 0);
  });
  document.querySelectorAll(".show-overlay").forEach(function (box) {
    box.addEventListener("change", function () {
      nv.setOpacity(Number(box.dataset.index), box.checked ? MASK_OPACITY : 0);
    });
  });

  // ---- editing
  function pen(label, enabled, value, filled) {
    nv.setDrawingEnabled(enabled);
    if (enabled) { nv.setPenValue(value, filled); }
    $("pen-state").textContent = label;
  }
  function startEditing() {
    window.khe.editing = true;
    $("edit-tools").hidden = false;
    $("show-mask").checked = true;
    nv.setDrawOpacity(MASK_OPACITY);
    pen("drawing (add)", true, 1, false);
    $("error").textContent = "Correct the mask (red), then Save edited mask.";
  }
  $("pen-add").addEventListener("click", function () { pen("drawing (add)", true, 1, false); });
  $("pen-fill").addEventListener("click", function () { pen("drawing (filled outline)", true, 1, true); });
  $("pen-erase").addEventListener("click", function () { pen("erasing", true, 0, false); });
  $("pen-off").addEventListener("click", function () { pen("navigating", false); });
  $("undo").addEventListener("click", function () { nv.drawUndo(); });

  // ---- verdicts
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
  }
  async function submit(verdict, maskBytes) {
    const form = new FormData();
    form.append("verdict", verdict);
    form.append("comment", $("comment").value);
    if (maskBytes) {
      form.append("mask", new Blob([maskBytes], { type: "application/octet-stream" }), "drawing.nii");
    }
    $("error").textContent = "saving...";
    let resp;
    try {
      resp = await fetch("/api/case/" + code + "/read", {
        method: "POST", body: form, credentials: "same-origin", headers: { "X-Khe-Vol": "reader" },
      });
    } catch (err) {
      $("error").textContent = "Not saved: the server cannot be reached (" + err + ")";
      return;
    }
    const data = await resp.json().catch(function () { return { error: "HTTP " + resp.status }; });
    if (!resp.ok) {
      $("error").textContent = "Not saved: " + data.error;
      return;
    }
    $("error").textContent = "Saved.";
    render(data);
  }
  document.querySelectorAll("button.verdict").forEach(function (b) {
    b.addEventListener("click", function () {
      if (b.dataset.verdict === "edited") { startEditing(); return; }
      submit(b.dataset.verdict, null);
    });
  });
  $("save-edit").addEventListener("click", async function () {
    // filename "" makes NiiVue return the NIfTI bytes instead of downloading them.
    const bytes = await nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    if (!(bytes instanceof Uint8Array)) {
      $("error").textContent = "Not saved: the viewer has no drawing to save";
      return;
    }
    await submit("edited", bytes);
  });

  window.khe.ready = true;
  document.body.dataset.ready = "1";
})();
