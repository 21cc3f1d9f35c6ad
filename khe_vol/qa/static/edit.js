// Mask editing on the case page (the "Edited" verdict): NiiVue's pen on the drawing layer.
// Loaded after case.js, which exposes what this needs on window.khe (nv, submit, dropClicks, ...).
(function () {
  "use strict";
  const khe = window.khe;
  const $ = khe.$;

  function pen(label, enabled, value, filled) {
    khe.nv.setDrawingEnabled(enabled);
    if (enabled) { khe.nv.setPenValue(value, filled); }
    $("pen-state").textContent = label;
  }
  // Called by case.js when the reader presses "Edited".
  khe.startEditing = function () {
    // A pen drawing cannot be recomputed from clicks: it is saved as drawn, without them.
    khe.dropClicks();
    khe.editing = true;
    $("edit-tools").hidden = false;
    $("show-mask").checked = true;
    khe.nv.setDrawOpacity(khe.MASK_OPACITY);
    pen("drawing (add)", true, 1, false);
    $("error").textContent = "Correct the mask (red), then Save edited mask. (Pen edits are saved as drawn, "
      + "without clicks; a new click would redraw the mask from the clicks.)";
  };

  $("pen-add").addEventListener("click", function () { pen("drawing (add)", true, 1, false); });
  $("pen-fill").addEventListener("click", function () { pen("drawing (filled outline)", true, 1, true); });
  $("pen-erase").addEventListener("click", function () { pen("erasing", true, 0, false); });
  $("pen-off").addEventListener("click", function () { pen("navigating", false); });
  $("undo").addEventListener("click", function () { khe.nv.drawUndo(); });
  $("save-edit").addEventListener("click", async function () {
    // filename "" makes NiiVue return the NIfTI bytes instead of downloading them.
    const bytes = await khe.nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    if (!(bytes instanceof Uint8Array)) {
      $("error").textContent = "Not saved: the viewer has no drawing to save";
      return;
    }
    await khe.submit("edited", bytes);
  });
  // While editing, Ctrl+Z undoes the pen (case.js leaves Ctrl keys to this script then).
  document.addEventListener("keydown", function (e) {
    const tag = (e.target && e.target.tagName) || "";
    if (!khe.editing || tag === "TEXTAREA" || tag === "INPUT") { return; }
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z" && !e.shiftKey) {
      e.preventDefault();
      khe.nv.drawUndo();
    }
  });
})();
