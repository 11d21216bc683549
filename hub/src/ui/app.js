// Flotilla web UI: live updates. The hub sends a `change` event whenever
// something a page shows may have changed; the page then fetches its live part
// again (the same URL, with the fragment header) and swaps it in. Without
// JavaScript every page still works, reloaded by hand.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!live || live.dataset.live !== "on" || !window.EventSource) {
    return;
  }
  var busy = false;
  var again = false;
  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }
  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(location.href, {
      headers: { "X-Flotilla-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store"
    })
      .then(function (r) {
        if (r.status === 401) {
          location.reload();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (text) {
        if (text !== null) {
          live.innerHTML = text;
          live.dataset.updated = String(Date.now());
        }
      })
      .catch(function () {
        say("update failed; retrying");
      })
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }
  var events = new EventSource("/ui/events");
  events.addEventListener("hello", function () {
    say("live");
    document.body.dataset.live = "connected";
  });
  events.addEventListener("change", refresh);
  events.onerror = function () {
    say("reconnecting…");
    document.body.dataset.live = "reconnecting";
  };
})();
