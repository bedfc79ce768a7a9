// The attribute panel: one instance's DICOM JSON (WADO-RS metadata, PS3.18 F.2) as a
// table of keyword and tag, VR and value; sequence items indented with ">" as dcmdump does.

import { KEYWORDS, el, valueText } from "./dicom.js";

const MAX_ROWS = 2000; // a huge structured report stays readable and fast

function tagText(tag) {
  return `(${tag.slice(0, 4)},${tag.slice(4)})`;
}

function rows(ds, depth, out) {
  for (const tag of Object.keys(ds).sort()) {
    if (out.length >= MAX_ROWS) return;
    const elem = ds[tag];
    const keyword = KEYWORDS[tag] || (tag.slice(4, 8) === "0000" ? "GroupLength" : "");
    const name = keyword || (parseInt(tag.slice(0, 4), 16) % 2 ? "(private)" : "");
    out.push(el("tr", { class: depth ? "nested" : null },
      el("td", { class: "tag" }, el("span", { class: "kw" }, ">".repeat(depth), name),
        el("code", {}, tagText(tag))),
      el("td", { class: "vr" }, elem.vr || ""),
      el("td", { class: "val" }, valueText(elem))));
    if (elem.vr === "SQ" && Array.isArray(elem.Value)) {
      for (const item of elem.Value) if (item && typeof item === "object") rows(item, depth + 1, out);
    }
  }
}

// The panel's contents for a data set; the filter box keeps its text between images.
export function panel(state) {
  const filter = el("input", { id: "attr-filter", type: "search", autocomplete: "off",
    spellcheck: "false", placeholder: "tag, keyword or value" });
  const body = el("tbody");
  const note = el("p", { class: "muted small", role: "status" });
  const apply = () => {
    const q = filter.value.trim().toLowerCase();
    let shown = 0;
    for (const tr of body.rows) {
      const hit = !q || tr.textContent.toLowerCase().includes(q);
      tr.hidden = !hit;
      if (hit) shown += 1;
    }
    note.textContent = q ? `${shown} of ${body.rows.length} attributes match` : "";
  };
  filter.addEventListener("input", () => { state.filter = filter.value; apply(); });
  const root = el("div", { class: "attr-panel" },
    el("div", { class: "field" }, el("label", { for: "attr-filter" }, "Filter attributes"), filter),
    note,
    el("div", { class: "attr-scroll" },
      el("table", { class: "attrs" },
        el("caption", { class: "sr-only" }, "DICOM attributes of the current image"),
        el("thead", {}, el("tr", {},
          el("th", { scope: "col" }, "Attribute"), el("th", { scope: "col" }, "VR"),
          el("th", { scope: "col" }, "Value"))),
        body)));
  return {
    root,
    show(ds) {
      const out = [];
      rows(ds || {}, 0, out);
      body.replaceChildren(...out);
      filter.value = state.filter || "";
      apply();
    },
    message(text) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 3, class: "muted" }, text)));
    },
  };
}
