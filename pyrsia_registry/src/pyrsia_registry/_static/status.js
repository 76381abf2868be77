"use strict";
// The pyrsia node's status page: polls /api/status and /api/activity (read-only GETs)
// and renders with textContent only (request paths and peer data are untrusted text).
(function () {
  var root = document.querySelector('meta[name="pyrsia-root"]').getAttribute("content");
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, text, cls, title) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    if (title) e.title = title;
    return e;
  }
  function short(id) { return id && id.length > 16 ? id.slice(0, 16) + "…" : (id || ""); }
  // "…/blobs/sha256:5af31004b1a8…": digests shortened for reading; the title has it all.
  function shortDigests(text) {
    return text.replace(/(sha256:[0-9a-f]{12})[0-9a-f]{52}/g, "$1…");
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  }
  function ago(t) {
    if (!t) return "–";
    var s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }
  function dl(node, pairs) {
    node.replaceChildren();
    pairs.forEach(function (p) {
      node.appendChild(el("dt", p[0]));
      node.appendChild(el("dd", p[1], p[2], p[3]));
    });
  }
  function rows(table, emptyId, items, cells) {
    var body = table.tBodies[0];
    body.replaceChildren();
    items.forEach(function (item) {
      var tr = document.createElement("tr");
      cells(item).forEach(function (c) { tr.appendChild(c instanceof Node ? c : el("td", c)); });
      body.appendChild(tr);
    });
    $(emptyId).hidden = items.length > 0;
    table.hidden = items.length === 0;
  }
  function sourceCell(p) {
    var td = el("td");
    var label = p.source + (p.source_detail ? " " + short(p.source_detail) : "");
    td.appendChild(el("span", label, "src src-" + p.source, p.source_detail || p.source));
    return td;
  }

  function renderStatus(s) {
    dl($("node"), [
      ["Node id", short(s.node_id), "mono", s.node_id],
      ["Role", s.is_build_node ? "build node" : "mirror (not a build node)"],
      ["Addresses", (s.peer_addresses || []).join(", ") || "–"],
      ["Network", s.network_origin],
      ["Upstream", s.upstream || "–"],
    ]);
    dl($("ledger"), [
      ["Height", s.ledger_height],
      ["Head", short(s.ledger_head), "mono", s.ledger_head],
      ["Records", s.log_records],
      ["Build nodes", (s.authorized_build_nodes || []).map(short).join(", "), "mono",
       (s.authorized_build_nodes || []).join("\n")],
    ]);
    var pct = s.disk_allocated ? Math.min(100, 100 * s.disk_usage / s.disk_allocated) : 0;
    dl($("disk"), [
      ["Used", bytes(s.disk_usage) + " of " + bytes(s.disk_allocated) + " (" + pct.toFixed(1) + "%)"],
      ["Artifacts", s.artifact_count],
    ]);
    $("diskbar").style.width = pct + "%";
  }

  function renderActivity(a) {
    var sync = $("ledger");
    sync.appendChild(el("dt", "Sync"));
    sync.appendChild(el("dd", a.sync.ready ? "in sync" : a.sync.reason));
    if (a.consensus) {
      sync.appendChild(el("dt", "Consensus"));
      sync.appendChild(el("dd", a.consensus));
    }
    rows($("pulls"), "pulls-empty", a.pulls, function (p) {
      var what = p.method + " " + p.path;
      return [ago(p.time), el("td", shortDigests(what), "mono", what), p.status, bytes(p.bytes),
              sourceCell(p), (p.seconds * 1000).toFixed(1) + " ms"];
    });
    rows($("peers"), "peers-empty", a.peers, function (p) {
      return [el("td", short(p.node_id), "mono", p.node_id), p.address, p.transport,
              ago(p.last_seen), bytes(p.bytes_in),
              p.throughput ? bytes(p.throughput) + "/s" : "–",
              p.is_build_node ? "build node" : "mirror"];
    });
    $("uploads").textContent = "Uploaded to peers: " + bytes(a.uploads.bytes) +
      (a.uploads.waits ? " (" + a.uploads.waits + " waits for the upload-rate limit)" : "");
    var b = a.builds;
    $("build-summary").textContent = b.running + " running, " + b.queued + " queued, " +
      b.waiting_for_quorum + " waiting for the build nodes";
    rows($("builds"), "builds-empty", b.recent, function (x) {
      return [x.package_type + " " + x.package_specific_id, x.status, ago(x.started),
              x.reason || ""];
    });
    rows($("failures"), "failures-empty", a.failures, function (f) {
      return [ago(f.time), f.reason, el("td", f.blamed, "mono"),
              el("td", shortDigests(f.detail + (f.digest ? " (" + f.digest + ")" : "")), null,
                 f.detail + (f.digest ? " (" + f.digest + ")" : ""))];
    });
  }

  function get(path) {
    return fetch(root + path, { headers: { accept: "application/json" }, cache: "no-store" })
      .then(function (r) {
        return r.json().then(function (body) {
          if (!r.ok) throw new Error(path + ": " + (body.error || r.status));
          return body;
        });
      });
  }

  var busy = false;
  function refresh() {
    if (busy) return;
    busy = true;
    Promise.all([get("/api/status"), get("/api/activity")]).then(function (both) {
      renderStatus(both[0]);
      renderActivity(both[1]);
      $("error").hidden = true;
      $("live").textContent = "live · " + new Date().toLocaleTimeString();
      $("live").className = "badge ok";
      document.body.dataset.seq = both[1].seq;
    }).catch(function (err) {
      $("error").textContent = "Cannot reach the node: " + err.message;
      $("error").hidden = false;
      $("live").textContent = "offline";
      $("live").className = "badge bad";
    }).then(function () { busy = false; });
  }
  refresh();
  setInterval(refresh, 1000);
})();
