// Study page: the patient and study header (QIDO study level) and the series as
// thumbnails (QIDO series level, WADO-RS thumbnails), each opening the viewer.

import {
  DW, el, errorBox, first, fmtDate, fmtTime, getJSON, num, personName, query,
} from "./dicom.js";

let uiConfig = null; // GET /api/ui-config, asked once per page load

export function config() {
  if (!uiConfig) uiConfig = getJSON("/api/ui-config").catch(() => ({}));
  return uiConfig;
}

export function render(root, { study }) {
  let live = true;
  const heading = el("h1", {}, "Study");
  const crumbs = el("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
    el("a", { href: "#/" }, "Studies"), " / ", el("span", { "aria-current": "page" }, "Study"));
  const header = el("section", { class: "study-header", "aria-label": "Patient and study" },
    el("p", { class: "muted" }, "Loading…"));
  const seriesHead = el("h2", { id: "series-heading" }, "Series");
  const status = el("p", { class: "status", role: "status", "aria-live": "polite" });
  const grid = el("ul", { class: "series-grid", "aria-labelledby": "series-heading" });
  root.append(crumbs, heading, header, seriesHead, status, grid);
  const suid = encodeURIComponent(study);

  getJSON(`${DW}/studies${query({ StudyInstanceUID: study, includefield: "00081030,00080090,00200010" })}`)
    .then(async (found) => {
      if (!live) return;
      if (!found.length) {
        heading.textContent = "Study not found";
        header.replaceChildren(el("p", { class: "error", role: "alert" },
          "The archive holds no study with this UID."));
        return;
      }
      const s = found[0];
      const name = personName(first(s, "00100010")) || "(no name)";
      const desc = String(first(s, "00081030") || "(no description)");
      heading.textContent = `${desc} — ${name}`;
      crumbs.lastChild.textContent = desc;
      document.title = `${desc} · ${name} · ANIM archive`;
      header.replaceChildren(studyHeader(s));
      const cfg = await config();
      if (live && cfg && cfg.ohif_url) {
        const base = String(cfg.ohif_url).replace(/\/+$/, "");
        header.append(el("p", { class: "external" }, el("a", {
          class: "button",
          href: `${base}/viewer?StudyInstanceUIDs=${encodeURIComponent(study)}`,
          target: "_blank", rel: "noopener noreferrer",
        }, "Open in OHIF", el("span", { class: "sr-only" }, " (opens in a new tab)"))));
      }
    })
    .catch((err) => { if (live) header.replaceChildren(errorBox(err, "the study")); });

  getJSON(`${DW}/studies/${suid}/series${query({ includefield: "0008103E" })}`)
    .then((series) => {
      if (!live) return;
      series.sort((a, b) => num(a, "00200011", 1e9) - num(b, "00200011", 1e9));
      status.textContent = `${series.length} series`;
      grid.replaceChildren(...series.map((r) => card(study, r)));
    })
    .catch((err) => { if (live) grid.replaceChildren(el("li", {}, errorBox(err, "the series"))); });

  document.title = "Study · ANIM archive";
  return () => { live = false; };
}

function studyHeader(s) {
  const rows = [
    ["Patient", personName(first(s, "00100010"))],
    ["Patient ID", [first(s, "00100020"), first(s, "00100021")].filter(Boolean).join(" · ")],
    ["Birth date", fmtDate(first(s, "00100030"))],
    ["Sex", first(s, "00100040")],
    ["Study date", [fmtDate(first(s, "00080020")), fmtTime(first(s, "00080030"))].filter(Boolean).join(" ")],
    ["Description", first(s, "00081030")],
    ["Modalities", (s["00080061"]?.Value || []).join(", ")],
    ["Accession", first(s, "00080050")],
    ["Study ID", first(s, "00200010")],
    ["Referring physician", personName(first(s, "00080090"))],
    ["Images", `${num(s, "00201208", 0)} in ${num(s, "00201206", 0)} series`],
    ["Study UID", first(s, "0020000D")],
  ];
  return el("dl", { class: "facts" }, rows.filter(([, v]) => v !== "" && v !== undefined)
    .map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, String(v)))));
}

function card(study, r) {
  const uid = first(r, "0020000E");
  const mod = String(first(r, "00080060") || "");
  const desc = String(first(r, "0008103E") || "(no description)");
  const count = num(r, "00201209", 0);
  const number = first(r, "00200011");
  const href = `#/viewer/${encodeURIComponent(study)}/${encodeURIComponent(uid)}`;
  return el("li", { class: "series-card", "data-series": uid },
    el("a", { href },
      el("img", {
        src: `${DW}/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(uid)}/thumbnail`,
        width: 128, height: 128, loading: "lazy", decoding: "async", class: "thumb",
        alt: `Preview of series ${number || desc}`,
      }),
      el("span", { class: "series-title" }, desc),
      el("span", { class: "series-meta" },
        [number !== "" ? `#${number}` : "", mod, `${count} image${count === 1 ? "" : "s"}`]
          .filter(Boolean).join(" · "))));
}
