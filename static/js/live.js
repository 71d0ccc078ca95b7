// The console's live connection: one websocket per page, to the surface the
// page names in data-live-socket (/ws/fleet/ or /ws/sites/<uuid>/).
//
// * Every message is re-dispatched as an "edgewise:live" event on document
//   (detail = the message), for the map and the charts.
// * {"type": "changed"} refreshes every [data-live-refresh] element through
//   its own hx-get (at most once a second), so a table changes as soon as
//   the control plane knows; the elements' 5 s polling stays as the fallback.
// * Times marked class="live-ago" are re-worded every second ("12 s ago"),
//   against the server's clock, so "last confirmed" keeps ageing on screen
//   even when nothing arrives: silence is shown, not hidden.
// * The indicator says whether the page is live; the socket reconnects with
//   back-off (1 s doubling to 30 s) after the control plane or the link drops.
(function () {
  "use strict";
  const indicator = document.querySelector("[data-live-socket]");
  let offsetMs = 0; // server clock minus browser clock
  let lastRefresh = 0;
  let refreshTimer = null;

  function serverNow() { return Date.now() + offsetMs; }

  function ago(date) {
    const s = Math.max(0, Math.floor((serverNow() - date.getTime()) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return Math.floor(s / 3600) + " h ago";
    return Math.floor(s / 86400) + " d ago";
  }

  function tick() {
    document.querySelectorAll("time.live-ago[datetime]").forEach(function (el) {
      const when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) el.textContent = ago(when);
    });
  }
  setInterval(tick, 1000);

  function refresh() {
    const wait = 1000 - (Date.now() - lastRefresh);
    if (wait > 0) {
      if (!refreshTimer) refreshTimer = setTimeout(function () { refreshTimer = null; refresh(); }, wait);
      return;
    }
    lastRefresh = Date.now();
    if (!window.htmx) return;
    document.querySelectorAll("[data-live-refresh][hx-get]").forEach(function (el) {
      window.htmx.ajax("GET", el.getAttribute("hx-get"), {source: el, target: el, swap: "outerHTML"});
    });
  }

  function setState(state, text) {
    if (!indicator) return;
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  window.EdgewiseLive = {serverNow: serverNow, ago: ago, refresh: refresh};
  if (!indicator || !("WebSocket" in window)) return;

  const path = indicator.dataset.liveSocket;
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
  let delay = 1000;

  function connect() {
    const socket = new WebSocket(url);
    socket.addEventListener("open", function () { delay = 1000; });
    socket.addEventListener("message", function (event) {
      let message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (message.type === "hello") {
        offsetMs = new Date(message.server_time).getTime() - Date.now();
        setState("live", "live");
        // Whatever happened while the socket was down.
        refresh();
      } else if (message.type === "changed") {
        refresh();
      }
      document.dispatchEvent(new CustomEvent("edgewise:live", {detail: message}));
    });
    socket.addEventListener("close", function (event) {
      if (event.code === 4403) {
        setState("refused", "not live: access refused");
        return;
      }
      setState("down", "reconnecting…");
      document.dispatchEvent(new CustomEvent("edgewise:live", {detail: {type: "down"}}));
      setTimeout(connect, delay);
      delay = Math.min(30000, delay * 2);
    });
  }
  connect();
})();
