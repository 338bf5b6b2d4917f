// The console's only script: the Copy button beside a secret shown once. Without
// JavaScript the button stays hidden and the secret is selected by one click (CSS
// user-select: all) to copy by hand.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) { return; }
    button.hidden = false;
    button.addEventListener("click", function () {
      var text = source.textContent.trim();
      var done = function () {
        button.textContent = "Copied";
        button.classList.add("copied");
        window.setTimeout(function () { button.textContent = "Copy"; button.classList.remove("copied"); }, 2000);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { selectOnly(source); });
      } else {
        selectOnly(source);
        try { if (document.execCommand("copy")) { done(); } } catch (e) { /* select stays: copy by hand */ }
      }
    });
  });

  function selectOnly(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
});
