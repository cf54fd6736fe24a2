/* lorafleet portal: upload with progress, live status, confirmations. No framework, no CDN. */
(function () {
  "use strict";

  var FINISHED = { ready: true, rejected: true };
  var POLL_MS = 1000;

  function csrfToken(root) {
    var input = (root || document).querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function errorText(xhrStatus, body) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && typeof body === "object") {
      return Object.keys(body).map(function (field) {
        var value = body[field];
        return field + ": " + (Array.isArray(value) ? value.join(" ") : String(value));
      }).join("; ");
    }
    if (xhrStatus === 413) return "The upload is larger than the server accepts.";
    return "The upload failed (HTTP " + xhrStatus + "). Try again.";
  }

  function setStatus(element, status) {
    element.textContent = status;
    element.className = element.className.replace(/\bstatus-\S+/g, "").trim() + " status-" + status;
    element.setAttribute("data-status", status);
    var history = (element.getAttribute("data-history") || "").split(" ").filter(Boolean);
    if (history[history.length - 1] !== status) history.push(status);
    element.setAttribute("data-history", history.join(" "));  /* what the page showed, in order */
  }

  /* Poll a version's JSON until it is ready or rejected; onUpdate gets every answer. */
  function pollVersion(url, onUpdate) {
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.json(); })
        .then(function (version) {
          onUpdate(version);
          if (!FINISHED[version.status]) window.setTimeout(tick, POLL_MS);
        })
        .catch(function () { window.setTimeout(tick, POLL_MS * 3); });
    }
    tick();
  }

  function initUpload(form) {
    var area = document.getElementById("upload-progress");
    var bar = document.getElementById("upload-bar");
    var percent = document.getElementById("upload-percent");
    var state = document.getElementById("upload-state");
    var errorBox = document.getElementById("upload-error");
    var done = document.getElementById("upload-done");
    var link = document.getElementById("upload-link");
    var button = document.getElementById("upload-button");
    var maxBytes = parseInt(form.getAttribute("data-max-bytes"), 10);

    function showProgress(fraction) {
      var value = Math.round(fraction * 100);
      bar.value = value;
      percent.textContent = value + "%";
      bar.setAttribute("data-events", String(parseInt(bar.getAttribute("data-events") || "0", 10) + 1));
    }

    function fail(message) {
      errorBox.textContent = message;
      errorBox.hidden = false;
      button.disabled = false;
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      errorBox.hidden = true;
      done.hidden = true;
      var data = new FormData(form);
      var total = 0;
      ["archive", "adapter_config", "adapter_model"].forEach(function (name) {
        var file = data.get(name);
        if (file && file.size === 0 && !file.name) data.delete(name); /* an empty file input */
        else if (file) total += file.size;
      });
      area.hidden = false;
      if (total > maxBytes) {
        fail("The files add up to " + total + " bytes, past the limit of " + maxBytes + " bytes.");
        return;
      }
      button.disabled = true;
      showProgress(0);
      state.textContent = "Uploading…";

      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRFToken", csrfToken(form));
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) showProgress(e.loaded / e.total);
      });
      xhr.upload.addEventListener("load", function () {
        showProgress(1);
        state.textContent = "Uploaded; the server is storing it…";
      });
      xhr.addEventListener("error", function () { fail("The connection failed during the upload. Try again."); });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (ignored) { /* not JSON */ }
        if (xhr.status !== 202 || !body) {
          state.textContent = "";
          fail(errorText(xhr.status, body));
          return;
        }
        showProgress(1);
        link.href = form.getAttribute("data-detail-url").replace("__name__", encodeURIComponent(body.adapter));
        link.textContent = "See " + body.model;
        done.hidden = false;
        var statusLabel = document.createElement("span");
        statusLabel.id = "upload-status";
        statusLabel.className = "status";
        state.textContent = body.model + ": ";
        state.appendChild(statusLabel);
        setStatus(statusLabel, body.status);
        pollVersion(body.url, function (version) {
          setStatus(statusLabel, version.status);
          if (version.status === "rejected") fail(version.error);
          if (version.status === "ready") button.disabled = false;
        });
      });
      xhr.send(data);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.addEventListener("submit", function (event) {
      var message = event.target.getAttribute("data-confirm");
      if (message && !window.confirm(message)) event.preventDefault();
    }, true);

    document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });

    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        var source = document.querySelector(button.getAttribute("data-copy"));
        if (source && navigator.clipboard) {
          navigator.clipboard.writeText(source.textContent.trim()).then(function () { button.textContent = "Copied"; });
        }
      });
    });

    /* Versions still in progress on an adapter's page: follow them, then reload to show the outcome. */
    document.querySelectorAll("[data-status-url]").forEach(function (element) {
      pollVersion(element.getAttribute("data-status-url"), function (version) {
        setStatus(element, version.status);
        if (FINISHED[version.status] && element.hasAttribute("data-reload-when-done")) window.location.reload();
      });
    });

    var uploadForm = document.querySelector("form[data-upload]");
    if (uploadForm) initUpload(uploadForm);
  });
})();
