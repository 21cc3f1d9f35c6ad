// Case page of the blinded reader app: NiiVue viewer, click segmentation, mask editing, verdicts.
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
  window.khe = { nv: nv, ready: false, editing: false, clicks: [], busy: false };
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
  // The crosshair starts at the volume's centre, which can lie on a boundary between two slices;
  // on a voxel centre, the slice shown is the slice a click lands in.
  nv.scene.crosshairPos = nv.vox2frac(nv.frac2vox(nv.scene.crosshairPos));
  nv.drawScene();

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
    if (clicks.length) {
      // A pen drawing cannot be recomputed from clicks: it is saved as drawn, without them.
      clicks = []; shown = []; redo = [];
      renderClicks();
    }
    $("click-mode").checked = false;
    window.khe.editing = true;
    $("edit-tools").hidden = false;
    $("show-mask").checked = true;
    nv.setDrawOpacity(MASK_OPACITY);
    pen("drawing (add)", true, 1, false);
    $("error").textContent = "Correct the mask (red), then Save edited mask. (Pen edits are saved as drawn, "
      + "without clicks; a new click would redraw the mask from the clicks.)";
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
  async function submit(verdict, maskBytes, clickList) {
    const form = new FormData();
    form.append("verdict", verdict);
    form.append("comment", $("comment").value);
    if (clickList) {
      form.append("clicks", JSON.stringify(clickList));
    } else if (maskBytes) {
      form.append("mask", new Blob([maskBytes], { type: "application/octet-stream" }), "drawing.nii");
    }
    if (window.kheReadTime) { window.kheReadTime.addTo(form, verdict); }  // time per read (readtime.js)
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
    if (window.kheReadTime) { window.kheReadTime.saved(); }
    $("error").textContent = "Saved.";
    render(data);
  }
  document.querySelectorAll("button.verdict").forEach(function (b) {
    b.addEventListener("click", async function () {
      if (b.dataset.verdict === "edited") { startEditing(); return; }
      if (b.dataset.verdict === "accept" && clicks.length) {
        // Accepting the mask the clicks made: an Edited read, whose mask the server recomputes.
        await pending;
        if (!shown.length) { $("error").textContent = "Not saved: no click has made a mask yet"; return; }
        await submit("edited", null, shown);
        return;
      }
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
      li.textContent = c.kind + " at (" + c.ras_mm.map(fmt).join(", ") + ") mm";
      li.title = "show this click";
      li.addEventListener("click", function () {
        nv.scene.crosshairPos = nv.mm2frac(c.ras_mm, 0, true);
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
      $("click-busy").textContent = "segmenting...";
      try {
        if (!list.length && view.needs_seed) {
          nv.createEmptyDrawing();
          nv.setDrawOpacity($("show-mask").checked ? MASK_OPACITY : 0);
          shown = [];
          renderClicks();
          $("error").textContent = "";
          return;
        }
        let resp;
        try {
          resp = await fetch("/api/case/" + code + "/segment", {
            method: "POST", credentials: "same-origin", body: JSON.stringify({ clicks: list }),
            headers: { "X-Khe-Vol": "reader", "Content-Type": "application/json" },
          });
        } catch (err) {
          throw new Error("the server cannot be reached (" + err + ")");
        }
        if (!resp.ok) {
          const data = await resp.json().catch(function () { return { error: "HTTP " + resp.status }; });
          throw new Error(data.error);
        }
        const volumeMl = Number(resp.headers.get("X-Volume-Ml"));
        const blobUrl = URL.createObjectURL(await resp.blob());
        try {
          await nv.loadDrawingFromUrl(blobUrl, true);
        } finally {
          URL.revokeObjectURL(blobUrl);
        }
        nv.setDrawOpacity($("show-mask").checked ? MASK_OPACITY : 0);
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
    down = e.button === 0 ? { x: e.clientX, y: e.clientY } : null;
  });
  canvas.addEventListener("pointerup", function (e) {
    const start = down;
    down = null;
    if (!start || e.button !== 0 || !$("click-mode").checked || window.khe.editing) { return; }
    if (Math.hypot(e.clientX - start.x, e.clientY - start.y) > 4) { return; }
    const rect = canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const frac = nv.canvasPos2frac([(e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr]);
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

  $("click-kind").addEventListener("click", function () { setKind(!excludeByDefault); });
  $("click-undo").addEventListener("click", undoClick);
  $("click-redo").addEventListener("click", redoClick);
  $("click-clear").addEventListener("click", function () {
    if (!clicks.length) { return; }
    redo = clicks.slice().reverse();  // Redo brings them back one by one
    setClicks([]);
  });
  document.addEventListener("keydown", function (e) {
    const tag = (e.target && e.target.tagName) || "";
    if (tag === "TEXTAREA" || tag === "INPUT") { return; }
    const key = e.key.toLowerCase();
    if ((e.ctrlKey || e.metaKey) && key === "z" && !e.shiftKey) {
      e.preventDefault();
      if (window.khe.editing) { nv.drawUndo(); } else { undoClick(); }
    } else if ((e.ctrlKey || e.metaKey) && (key === "y" || (key === "z" && e.shiftKey))) {
      e.preventDefault();
      if (!window.khe.editing) { redoClick(); }
    } else if (!e.ctrlKey && !e.metaKey && !e.altKey && key === "e") {
      setKind(!excludeByDefault);
    } else if (!e.ctrlKey && !e.metaKey && !e.altKey && key === "c") {
      $("click-mode").checked = !$("click-mode").checked;
    }
  });
  renderClicks(view.current && view.current.clicks ? view.current.edited_volume_ml : undefined);

  // Let the server do what does not depend on the first click (bias correction of the
  // series, the proposed mask's region) while the reader looks; failures show at the click.
  fetch("/api/case/" + code + "/prepare", {
    method: "POST", credentials: "same-origin", headers: { "X-Khe-Vol": "reader" },
  }).catch(function () {});

  window.khe.ready = true;
  document.body.dataset.ready = "1";
})();
