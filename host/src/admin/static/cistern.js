// Cistern admin UI: keeps the "Downloads in progress" table current by
// polling /api/downloads. The page is complete without it.
"use strict";

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  if (n < 1024) return Math.floor(n) + " B";
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return n.toFixed(1) + " " + units[u];
}

function fmtAge(s) {
  s = Math.floor(s);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  if (s < 172800) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

function downloadRow(d) {
  const tr = document.createElement("tr");
  tr.className = "download";
  tr.dataset.key = d.key;
  cell(tr, d.path || d.key, "name").title = d.key;
  cell(tr, d.state, "state");
  const p = cell(tr, "", "progress");
  const bar = document.createElement("progress");
  const text = document.createElement("span");
  text.className = "progress-text";
  if (d.length !== null) {
    bar.max = d.length;
    bar.value = d.written;
    const pct = d.length === 0 ? 100 : Math.round(d.written * 100 / d.length);
    text.textContent = fmtBytes(d.written) + " of " + fmtBytes(d.length) + " (" + pct + "%)";
  } else {
    text.textContent = fmtBytes(d.written) + " (length unknown)";
  }
  p.append(bar, " ", text);
  cell(tr, fmtBytes(d.rate_bytes_per_sec) + "/s", "num rate");
  cell(tr, String(d.readers), "num readers");
  cell(tr, fmtAge(d.elapsed_secs), "num");
  return tr;
}

async function refreshDownloads() {
  const body = document.getElementById("downloads-body");
  if (!body) return;
  try {
    const resp = await fetch("/api/downloads", { cache: "no-store" });
    if (!resp.ok) return;
    const list = await resp.json();
    const rows = list.map(downloadRow);
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell(tr, "No downloads in progress.");
      td.colSpan = 6;
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    body.dataset.updated = new Date().toISOString();
    const count = document.getElementById("downloads-count");
    if (count) count.textContent = String(list.length);
  } catch (e) {
    // Cistern restarting or gone: keep the last picture.
  }
}

if (document.getElementById("downloads-body")) {
  setInterval(refreshDownloads, 2000);
}
