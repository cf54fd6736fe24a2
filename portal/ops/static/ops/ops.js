/* The ops dashboard: fetch the live fragment every interval and swap it in place. Sorting and the
   tenant filter change the page's query string (no reload) and fetch at once. The Pin buttons are plain
   forms that post and come back to the page, so a swapped-in fragment's buttons work as the first ones.
   No framework, no CDN. */
(function () {
  "use strict";

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("ops-live");
    if (!live) return;
    var connection = document.getElementById("ops-connection");
    var interval = parseInt(live.getAttribute("data-interval-ms"), 10) || 1500;
    var timer = null;
    var inFlight = false;
    var again = false;  /* asked for while a fetch was running */
    var stopped = false;

    function say(text, bad) {
      connection.textContent = text;
      connection.className = bad ? "bad" : "";
    }

    function schedule(delay) {
      window.clearTimeout(timer);
      if (stopped || (document.hidden && delay > 0)) return;  /* a hidden tab resumes when shown */
      timer = window.setTimeout(refresh, delay);
    }

    /* A menu is open, or a Pin button is pressed or has the keyboard: a swap now would take it away. */
    function holding() {
      var focused = document.activeElement;
      return !!focused && live.contains(focused) && (focused.tagName === "SELECT" || focused.tagName === "BUTTON");
    }

    function refresh() {
      if (inFlight) { again = true; return; }
      if (holding()) {
        schedule(interval);
        return;
      }
      inFlight = true;
      var next = interval;
      fetch(live.getAttribute("data-live-url") + window.location.search, {
        credentials: "same-origin", headers: { Accept: "text/html" }, cache: "no-store"
      }).then(function (response) {
        if (response.redirected || response.status === 401 || response.status === 403) {
          stopped = true;
          say("signed out: reload the page to sign in again", true);
          return null;
        }
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      }).then(function (html) {
        if (html === null || holding()) return;  /* focus came while fetching: the next refresh swaps */
        live.innerHTML = html;
        live.setAttribute("data-updates", String(parseInt(live.getAttribute("data-updates"), 10) + 1));
        say("live", false);
      }).catch(function (error) {
        say("the portal did not answer (" + error.message + "); retrying", true);
        next = interval * 2;
      }).then(function () {
        inFlight = false;
        schedule(again ? 0 : next);
        again = false;
      });
    }

    function navigate(search) {
      window.history.replaceState(null, "", window.location.pathname + search);
      schedule(0);
    }

    live.addEventListener("click", function (event) {
      var link = event.target.closest("a[data-ops-sort]");
      if (!link) return;
      event.preventDefault();
      navigate(new URL(link.href).search);
    });

    live.addEventListener("change", function (event) {
      var form = event.target.closest("form[data-ops-filter]");
      if (!form) return;
      var params = new URLSearchParams(window.location.search);
      new FormData(form).forEach(function (value, name) {
        if (value) params.set(name, value); else params.delete(name);
      });
      event.target.blur();
      navigate("?" + params.toString());
    });

    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) schedule(0);
    });

    schedule(interval);
  });
})();
