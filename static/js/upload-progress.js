// Upload progress for forms marked data-upload-progress: htmx reports the
// request body's progress (htmx:xhr:progress) and a <progress> inside the form shows it.
document.addEventListener("htmx:xhr:progress", function (event) {
  const form = event.target.closest ? event.target.closest("form[data-upload-progress]") : null;
  if (!form) return;
  const bar = form.querySelector("progress");
  if (!bar || !event.detail.lengthComputable) return;
  bar.hidden = false;
  bar.max = event.detail.total;
  bar.value = event.detail.loaded;
});
