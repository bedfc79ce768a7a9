// Admin view: what the archive holds and saves, what arrived lately (the change
// sequence), and who sends (known AE titles and other senders with their last activity).
// Each part loads on its own, so one failing answer leaves the others readable.

import {
  el, errorBox, fmtBytes, fmtDateTime, fmtInt, getJSON, shortUID,
} from "./dicom.js";

export function render(root) {
  let live = true;
  document.title = "Admin · ANIM archive";
  const summary = el("section", { "aria-labelledby": "a-sum" },
    el("h2", { id: "a-sum" }, "Holdings and storage"), el("p", { class: "muted" }, "Loading…"));
  const changes = el("section", { "aria-labelledby": "a-chg" },
    el("h2", { id: "a-chg" }, "Recent changes"), el("p", { class: "muted" }, "Loading…"));
  const peers = el("section", { "aria-labelledby": "a-peers" },
    el("h2", { id: "a-peers" }, "Senders and known AE titles"), el("p", { class: "muted" }, "Loading…"));
  const refresh = el("button", { type: "button", onclick: () => load() }, "Refresh");
  const status = el("p", { class: "status", role: "status", "aria-live": "polite" });
  root.append(el("div", { class: "title-row" }, el("h1", {}, "Admin"), refresh), status,
    summary, peers, changes);

  const fill = (section, what, build) => (data) => {
    if (!live) return;
    section.replaceChildren(section.firstChild, build(data));
  };
  const failed = (section, what) => (err) => {
    if (!live) return;
    section.replaceChildren(section.firstChild, errorBox(err, what));
  };

  function load() {
    status.textContent = "Loading…";
    Promise.allSettled([
      getJSON("/api/admin/summary").then(fill(summary, "summary", summaryView),
        failed(summary, "the summary")),
      getJSON("/api/admin/changes?limit=50").then(fill(changes, "changes", changesView),
        failed(changes, "the recent changes")),
      getJSON("/api/admin/peers").then(fill(peers, "peers", peersView),
        failed(peers, "the senders")),
    ]).then(() => { if (live) status.textContent = `Updated ${fmtDateTime(new Date().toISOString())}`; });
  }
  load();
  return () => { live = false; };
}

function summaryView(s) {
  const counts = [["Patients", s.patients], ["Studies", s.studies], ["Series", s.series],
    ["Instances", s.instances]];
  const received = Number(s.received_bytes) || 0;
  const stored = Number(s.stored_bytes) || 0;
  const saved = Number(s.saved_bytes ?? received - stored) || 0;
  const share = received > 0 ? saved / received : 0;
  const pct = `${(share * 100).toFixed(1)} %`;
  const bar = el("div", { class: "bar", role: "img",
    "aria-label": `Deduplication saved ${pct} of the bytes received` },
  el("span", { class: "bar-stored" }), el("span", { class: "bar-saved" }));
  // widths through the CSSOM (allowed by the page's CSP, unlike a style attribute)
  bar.firstChild.style.width = `${(1 - share) * 100}%`;
  bar.lastChild.style.width = `${share * 100}%`;
  return el("div", {},
    el("dl", { class: "cards" }, counts.map(([k, v]) =>
      el("div", { class: "card" }, el("dt", {}, k), el("dd", {}, fmtInt(v))))),
    el("dl", { class: "cards" },
      el("div", { class: "card" }, el("dt", {}, "Received"), el("dd", {}, fmtBytes(received))),
      el("div", { class: "card" }, el("dt", {}, "Stored"), el("dd", {}, fmtBytes(stored))),
      el("div", { class: "card good" }, el("dt", {}, "Saved by deduplication"),
        el("dd", {}, `${fmtBytes(saved)} (${pct})`))),
    bar,
    el("p", { class: "muted small" }, "Received: every byte sent to the archive. Stored: bytes ",
      "written to the blob store. Identical pixel data, headers and re-sent instances are kept once.",
      s.unmeasured_versions ? ` ${fmtInt(s.unmeasured_versions)} versions stored before the ` +
        "archive counted bytes are not in these figures." : ""));
}

function uidCell(uid, href) {
  if (!uid) return el("td", {}, "–");
  const text = el("code", { title: uid }, shortUID(uid));
  return el("td", {}, href ? el("a", { href, "aria-label": `Study ${uid}` }, text) : text);
}

function changesView(list) {
  if (!Array.isArray(list) || !list.length) return el("p", { class: "muted" }, "Nothing has arrived yet.");
  return el("div", { class: "table-scroll" }, el("table", { class: "data" },
    el("caption", { class: "sr-only" }, "The 50 latest changes, newest first"),
    el("thead", {}, el("tr", {}, ["#", "When", "What", "Study", "Series", "Instance"]
      .map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, list.map((c) => el("tr", {},
      el("td", { class: "num" }, c.seq),
      el("td", {}, fmtDateTime(c.at)),
      el("td", {}, String(c.kind || "").replaceAll("_", " ")),
      uidCell(c.study_uid, c.study_uid ? `#/study/${encodeURIComponent(c.study_uid)}` : null),
      uidCell(c.series_uid),
      uidCell(c.sop_uid))))));
}

function peersView(list) {
  if (!Array.isArray(list) || !list.length) return el("p", { class: "muted" }, "No sender and no configured AE title.");
  return el("div", { class: "table-scroll" }, el("table", { class: "data" },
    el("caption", { class: "sr-only" }, "Known AE titles and other senders"),
    el("thead", {}, el("tr", {}, ["AE title", "Host", "Institution", "Configured",
      "Last activity", "Instances"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, list.map((p) => el("tr", {},
      el("td", {}, el("code", {}, p.ae_title || "–")),
      el("td", {}, [p.host, p.port].filter((x) => x !== null && x !== undefined && x !== "").join(":") || "–"),
      el("td", {}, p.institution || "–"),
      el("td", {}, p.configured ? "yes" : "no"),
      el("td", {}, p.last_activity ? fmtDateTime(p.last_activity) : "never"),
      el("td", { class: "num" }, fmtInt(p.instances)))))));
}
