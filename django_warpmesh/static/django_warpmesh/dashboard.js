/* django-warpmesh dashboard: polls the stats endpoint and redraws. No dependencies. */
(function () {
  "use strict";

  var root = document.getElementById("warpmesh");
  if (!root) {
    return;
  }
  var statsUrl = root.getAttribute("data-stats-url");
  var refreshMs = Math.max(1, parseInt(root.getAttribute("data-refresh"), 10) || 2) * 1000;

  function byId(id) {
    return document.getElementById(id);
  }

  function setText(id, value) {
    var element = byId(id);
    if (element) {
      element.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
    }
  }

  function cell(row, content, className) {
    var td = document.createElement("td");
    if (className) {
      td.className = className;
    }
    if (content instanceof Node) {
      td.appendChild(content);
    } else {
      td.textContent = content;
    }
    row.appendChild(td);
    return td;
  }

  function code(value) {
    var element = document.createElement("code");
    element.textContent = value === null || value === undefined ? "—" : String(value);
    return element;
  }

  function latency(ms) {
    return ms === null || ms === undefined ? "—" : Number(ms).toFixed(3) + " ms";
  }

  function lastHeard(seconds) {
    return seconds === null || seconds === undefined ? "never" : Number(seconds).toFixed(1) + " s ago";
  }

  function renderPeers(peers) {
    var tbody = byId("wm-peers").tBodies[0];
    var rows = document.createDocumentFragment();
    if (!peers.length) {
      var empty = document.createElement("tr");
      empty.className = "empty";
      cell(empty, "No peers known to this process.").colSpan = 8;
      rows.appendChild(empty);
    }
    peers.forEach(function (peer) {
      var row = document.createElement("tr");
      row.className = peer.connected ? "ok" : "down";
      row.setAttribute("data-address", peer.address);
      var health = document.createElement("span");
      var dot = document.createElement("span");
      dot.className = "dot";
      dot.setAttribute("aria-hidden", "true");
      health.appendChild(dot);
      health.appendChild(document.createTextNode(peer.connected ? "connected" : "unreachable"));
      cell(row, health);
      cell(row, code(peer.id));
      cell(row, code(peer.address));
      cell(row, peer.source || "\u2014");
      cell(row, latency(peer.latency_ms), "num");
      cell(row, String(peer.invalidations_received), "num");
      cell(row, String(peer.gaps_detected), "num");
      cell(row, lastHeard(peer.last_heard_s), "num");
      rows.appendChild(row);
    });
    tbody.replaceChildren(rows);
  }

  function renderRejected(byReason) {
    var list = byId("wm-rejected");
    var items = document.createDocumentFragment();
    var reasons = Object.keys(byReason || {}).sort();
    if (!reasons.length) {
      var none = document.createElement("li");
      none.className = "none";
      none.textContent = "none";
      items.appendChild(none);
    }
    reasons.forEach(function (reason) {
      var item = document.createElement("li");
      item.appendChild(code(reason));
      item.appendChild(document.createTextNode(" " + byReason[reason]));
      items.appendChild(item);
    });
    list.replaceChildren(items);
  }

  function render(stats) {
    var badge = byId("wm-health");
    badge.className = "badge health-" + stats.health;
    badge.textContent = stats.health;
    setText("wm-peer-id", stats.peer_id);
    setText("wm-address", stats.address);
    setText("wm-host", stats.host);
    setText("wm-pid", stats.pid);
    setText("wm-discovery", stats.discovery);
    var transport = stats.transport;
    setText("wm-transport-name", transport && transport.name);
    setText("wm-transport-url", transport && transport.url);
    var link = byId("wm-transport-state");
    link.className = "link" + (transport ? (transport.connected ? " link-up" : " link-down") : "");
    link.textContent = transport ? (transport.connected ? "connected" : "not connected") : "—";
    var period = stats.heartbeat_period;
    setText("wm-heartbeat", period === null || period === undefined ? null : Number(period).toFixed(2) + " s");
    var linkDown = Boolean(transport && !transport.connected);
    var transportError = byId("wm-transport-error");
    transportError.textContent = linkDown
      ? "The " + transport.name + " link is down, new entries are capped meanwhile: " + (transport.last_error || "connecting")
      : "";
    transportError.hidden = !linkDown;
    var reason = byId("wm-reason");
    reason.textContent = stats.reason || "";
    reason.hidden = !stats.reason;
    var discoveryError = byId("wm-discovery-error");
    discoveryError.textContent = stats.discovery_error
      ? "Peer discovery is failing (" + stats.discovery_failures + " attempt(s) in a row): " + stats.discovery_error
      : "";
    discoveryError.hidden = !stats.discovery_error;
    document.querySelectorAll("[data-counter]").forEach(function (element) {
      var value = stats[element.getAttribute("data-counter")];
      element.textContent = value === null || value === undefined ? "0" : String(value);
    });
    renderPeers(stats.peers || []);
    renderRejected(stats.rejected_by_reason);
    document.title = "Warp Mesh · " + (stats.peer_id || "this process");
  }

  function showError(message) {
    var error = byId("wm-error");
    error.textContent = message ? " · " + message : "";
    error.hidden = !message;
  }

  function refresh() {
    if (document.hidden) {
      window.setTimeout(refresh, refreshMs);
      return;
    }
    window
      .fetch(statsUrl, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
      })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("stats endpoint answered HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (stats) {
        render(stats);
        showError("");
        setText("wm-updated", "updated " + new Date().toLocaleTimeString());
      })
      .catch(function (error) {
        showError("not updated: " + error.message);
      })
      .then(function () {
        window.setTimeout(refresh, refreshMs);
      });
  }

  refresh();
})();
