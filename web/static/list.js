// Study list: QIDO-RS search (PS3.18 10.6) with paging; the search lives in the hash
// (#/?name=doe&page=2) so a result page can be bookmarked and Back returns to it.

import {
  DW, MODALITIES, el, errorBox, first, fmtDate, getJSON, num, personName, query,
} from "./dicom.js";

export const PAGE_SIZE = 25;
const MAX_PAGE_SIZE = 200;

const FIELDS = [ // hash key, label, input type, hint
  ["name", "Patient name", "search", "Part of the name, any case"],
  ["id", "Patient ID", "search", "Exact; * and ? are wildcards"],
  ["acc", "Accession number", "search", "Exact; * and ? are wildcards"],
  ["from", "Study date from", "date", ""],
  ["to", "Study date to", "date", ""],
];

const COLUMNS = [ // sort key, header, value for sorting
  ["name", "Patient", (s) => personName(first(s, "00100010")).toLowerCase()],
  ["id", "Patient ID", (s) => String(first(s, "00100020"))],
  ["birth", "Birth date", (s) => String(first(s, "00100030"))],
  ["date", "Study date", (s) => `${first(s, "00080020")}${first(s, "00080030")}`],
  ["desc", "Description", (s) => String(first(s, "00081030")).toLowerCase()],
  ["mod", "Modalities", (s) => modalities(s)],
  ["acc", "Accession", (s) => String(first(s, "00080050"))],
  ["series", "Series", (s) => num(s, "00201206")],
  ["images", "Images", (s) => num(s, "00201208")],
];

const NON_IMAGE = new Set(["SR", "KO", "PR", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "FID"]);

let mounted = null; // {root, form, status, results, pager} while the list is on screen
let generation = 0; // answers of an older search are dropped

function modalities(s) {
  return [...new Set(s["00080061"]?.Value || [])].join(", ");
}

function dicomDate(iso) {
  return iso ? iso.replaceAll("-", "") : "";
}

// The QIDO parameters of a search as the form states it.
export function qidoParams(p) {
  const name = (p.get("name") || "").trim();
  const from = dicomDate(p.get("from"));
  const to = dicomDate(p.get("to"));
  const page = Math.max(0, Number(p.get("page") || 0) | 0);
  const size = pageSize(p);
  return {
    // infix, case-insensitive on the server (docs/dicomweb.md); a name the user already
    // wrote with wildcards is sent as written
    PatientName: name && (/[*?]/.test(name) ? name : `*${name}*`),
    PatientID: (p.get("id") || "").trim(),
    AccessionNumber: (p.get("acc") || "").trim(),
    StudyDate: from || to ? `${from}-${to}` : "",
    ModalitiesInStudy: p.get("mod") || "",
    // one more than a page: whether a next page exists, without counting everything
    limit: size + 1,
    offset: page * size,
  };
}

// Studies per page: 25, or the hash's size=N (a bookmarkable longer list).
function pageSize(p) {
  const n = Number(p.get("size") || PAGE_SIZE) | 0;
  return Math.min(MAX_PAGE_SIZE, Math.max(1, n || PAGE_SIZE));
}

export function render(root, { params }) {
  const heading = el("h1", {}, "Studies");
  const form = searchForm(params);
  const status = el("p", { id: "result-count", class: "status", role: "status", "aria-live": "polite" });
  const results = el("div", { class: "results" });
  const pager = el("nav", { class: "pager", "aria-label": "Result pages" });
  root.append(heading, form, status, results, pager);
  mounted = { root, form, status, results, pager };
  search(params);
  return () => { mounted = null; generation += 1; };
}

// Called when only the hash's query changes: keep the form (and the focus in it).
export function update({ params }) {
  if (!mounted || !mounted.root.isConnected) return false;
  fillForm(mounted.form, params);
  search(params);
  return true;
}

function searchForm(params) {
  const inputs = FIELDS.map(([key, label, type, hint]) => {
    const id = `q-${key}`;
    const hintId = hint ? `${id}-hint` : null;
    return el("div", { class: "field" },
      el("label", { for: id }, label),
      el("input", { id, name: key, type, autocomplete: "off", "aria-describedby": hintId,
        spellcheck: "false" }),
      hint ? el("small", { id: hintId }, hint) : null);
  });
  const mod = el("select", { id: "q-mod", name: "mod" },
    el("option", { value: "" }, "Any"),
    MODALITIES.map((m) => el("option", { value: m }, m)));
  const form = el("form", { class: "search", role: "search", "aria-label": "Find studies" },
    inputs,
    el("div", { class: "field" }, el("label", { for: "q-mod" }, "Modality"), mod),
    el("div", { class: "actions" },
      el("button", { type: "submit", class: "primary" }, "Search"),
      el("button", { type: "reset" }, "Clear")));
  fillForm(form, params);
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (String(v).trim()) p.set(k, String(v).trim());
    // a new search starts on its first page, in the same order and page size
    const now = new URLSearchParams(location.hash.split("?")[1] || "");
    for (const k of ["size", "sort", "dir"]) if (now.get(k)) p.set(k, now.get(k));
    go(p);
  });
  form.addEventListener("reset", (ev) => {
    ev.preventDefault();
    for (const f of form.elements) if ("value" in f && f.name) f.value = "";
    go(new URLSearchParams());
  });
  return form;
}

function fillForm(form, params) {
  for (const f of form.elements) if (f.name) f.value = params.get(f.name) || "";
}

function go(p) {
  const qs = p.toString();
  const target = `#/${qs ? `?${qs}` : ""}`;
  if (location.hash === target || (!location.hash && target === "#/")) {
    update({ params: p }); // same search again: refresh
  } else {
    location.hash = target;
  }
}

async function search(params) {
  const gen = ++generation;
  const { status, results, pager } = mounted;
  const q = qidoParams(params);
  status.textContent = "Searching…";
  results.setAttribute("aria-busy", "true");
  let studies;
  try {
    studies = await getJSON(`${DW}/studies${query(q)}`);
  } catch (err) {
    if (gen !== generation) return;
    status.textContent = "";
    results.replaceChildren(errorBox(err, "the studies"));
    pager.replaceChildren();
    results.removeAttribute("aria-busy");
    return;
  }
  if (gen !== generation) return;
  const size = q.limit - 1;
  const more = studies.length > size;
  studies = studies.slice(0, size);
  const page = q.offset / size;
  if (!studies.length) {
    status.textContent = page ? "No more studies." : "No study matches.";
  } else if (page === 0 && !more) {
    status.textContent = `${studies.length} ${studies.length === 1 ? "study" : "studies"}`;
  } else {
    status.textContent = `Studies ${q.offset + 1}–${q.offset + studies.length}` +
      (more ? " (more on the next page)" : "");
  }
  results.replaceChildren(studies.length ? table(studies, params) : "");
  results.removeAttribute("aria-busy");
  pager.replaceChildren(...pagerButtons(params, page, more));
}

function pagerButtons(params, page, more) {
  const to = (n) => () => {
    const p = new URLSearchParams(params);
    if (n) p.set("page", String(n)); else p.delete("page");
    go(p);
  };
  if (!page && !more) return [];
  return [
    el("button", { type: "button", disabled: page === 0, onclick: to(page - 1) }, "← Previous"),
    el("span", { class: "muted" }, `Page ${page + 1}`),
    el("button", { type: "button", disabled: !more, onclick: to(page + 1) }, "Next →"),
  ];
}

function table(studies, params) {
  const sortKey = params.get("sort") || "";
  const dir = params.get("dir") === "desc" ? -1 : 1;
  const col = COLUMNS.find((c) => c[0] === sortKey);
  const rows = [...studies];
  if (col) {
    rows.sort((a, b) => {
      const x = col[2](a);
      const y = col[2](b);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
  }
  const sortBy = (key) => () => {
    const p = new URLSearchParams(params);
    const flip = sortKey === key && dir === 1;
    p.set("sort", key);
    if (flip) p.set("dir", "desc"); else p.delete("dir");
    go(p);
  };
  const head = el("tr", {},
    el("th", { scope: "col" }, el("span", { class: "sr-only" }, "Thumbnail")),
    COLUMNS.map(([key, label]) => el("th", {
      scope: "col",
      "aria-sort": key === sortKey ? (dir === 1 ? "ascending" : "descending") : null,
      class: ["series", "images"].includes(key) ? "num" : null,
    }, el("button", { type: "button", class: "sort", onclick: sortBy(key),
      title: `Sort this page by ${label.toLowerCase()}` },
    label, el("span", { class: "arrow", "aria-hidden": "true" },
      key === sortKey ? (dir === 1 ? " ▲" : " ▼") : "")))));
  return el("table", { class: "studies" },
    el("caption", { class: "sr-only" },
      "Studies found. The column buttons sort the studies of this page."),
    el("thead", {}, head),
    el("tbody", {}, rows.map(row)));
}

function row(s) {
  const uid = first(s, "0020000D");
  const name = personName(first(s, "00100010")) || "(no name)";
  const desc = String(first(s, "00081030") || "");
  const href = `#/study/${encodeURIComponent(uid)}`;
  const mods = modalities(s);
  const images = !mods || mods.split(", ").some((m) => !NON_IMAGE.has(m));
  const thumb = images
    ? el("img", {
      src: `${DW}/studies/${encodeURIComponent(uid)}/thumbnail?viewport=64,64`,
      width: 64, height: 64, loading: "lazy", decoding: "async",
      alt: `${desc || "Study"}, ${name}`, class: "thumb",
    })
    : el("span", { class: "thumb none", "aria-hidden": "true" });
  const tr = el("tr", { "data-study": uid },
    el("td", { class: "thumbcell" }, thumb),
    el("td", {}, el("a", { href }, name)),
    el("td", {}, first(s, "00100020")),
    el("td", {}, fmtDate(first(s, "00100030"))),
    el("td", {}, fmtDate(first(s, "00080020"))),
    el("td", {}, desc),
    el("td", {}, mods),
    el("td", {}, first(s, "00080050")),
    el("td", { class: "num" }, num(s, "00201206", "")),
    el("td", { class: "num" }, num(s, "00201208", "")));
  // the whole row opens the study for a mouse; the link is the keyboard's way
  tr.addEventListener("click", (ev) => {
    if (ev.target.closest("a, button") || window.getSelection().toString()) return;
    location.hash = href;
  });
  return tr;
}
