// Time per read: seconds from opening the case page (or from the previous verdict given on it) to the
// verdict, and for an edited read from the first edit action to the save. Sent with the verdict
// (case.js's submit calls addTo and saved); the server keeps them with the read and never shows them.
(function () {
  "use strict";
  let since = 0;  // performance.now() counts from the page's navigation start: the case opening
  let firstEdit = null;
  function markEdit() {
    if (firstEdit === null) { firstEdit = performance.now(); }
  }
  // An edit action: a press on the image with the pen on or click-to-segment on, or an edit tool
  // (any button of the edit toolbar but Save). edit.js may also call window.kheReadTime.markEdit().
  document.addEventListener("pointerdown", function (e) {
    const t = e.target;
    if (!t || !t.closest) { return; }
    if (t.id === "gl" && e.button === 0) {
      const k = window.khe;
      const penOn = k && k.nv && k.nv.opts && k.nv.opts.drawingEnabled;
      const clickMode = document.getElementById("click-mode");
      if (penOn || (clickMode && clickMode.checked)) { markEdit(); }
    } else if (t.closest("#edit-tools button") && !t.closest("#save-edit")) {
      markEdit();
    }
  }, true);
  window.kheReadTime = {
    markEdit: markEdit,
    // Add the times to a verdict's form.
    addTo: function (form, verdict) {
      const now = performance.now();
      form.append("seconds_to_verdict", ((now - since) / 1000).toFixed(3));
      if (verdict === "edited" && firstEdit !== null) {
        form.append("edit_seconds", ((now - firstEdit) / 1000).toFixed(3));
      }
    },
    // A verdict was saved: the next one on this page is timed from now.
    saved: function () { since = performance.now(); firstEdit = null; },
  };
})();
