// The page's router: the hash names the view, so the one static page needs no server
// routes and the browser's back button, bookmarks and reloads all work.
//   #/ (or #/?PatientName=…&page=2)   study list
//   #/study/{studyUID}                 study page
//   #/viewer/{studyUID}/{seriesUID}    image viewer
//   #/admin                            admin view

import * as list from "./list.js";
import * as study from "./study.js";
import * as viewer from "./viewer.js";
import * as admin from "./admin.js";
import { el } from "./dicom.js";

const main = document.getElementById("main");
let cleanup = null;
let previousView = "";

function parse(hash) {
  const raw = hash.replace(/^#/, "") || "/";
  const [path, qs = ""] = raw.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(qs);
  if (parts[0] === "study" && parts[1]) return { view: "study", mod: study, args: { study: parts[1] } };
  if (parts[0] === "viewer" && parts[1] && parts[2]) {
    return { view: "viewer", mod: viewer, args: { study: parts[1], series: parts[2], params } };
  }
  if (parts[0] === "admin") return { view: "admin", mod: admin, args: {} };
  if (parts.length === 0) return { view: "list", mod: list, args: { params } };
  return { view: "missing", mod: null, args: { path } };
}

function route() {
  const { view, mod, args } = parse(location.hash);
  if (view === previousView && mod && mod.update && mod.update(args)) return;
  if (cleanup) { cleanup(); cleanup = null; }
  main.replaceChildren();
  main.dataset.view = view;
  document.body.dataset.view = view;
  for (const a of document.querySelectorAll("[data-nav]")) {
    const current = a.dataset.nav === (view === "admin" ? "admin" : "list");
    if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!mod) {
    document.title = "Not found · ANIM archive";
    main.append(el("h1", { tabindex: "-1" }, "Page not found"),
      el("p", {}, "Nothing lives at this address. ", el("a", { href: "#/" }, "Back to the studies")));
  } else {
    cleanup = mod.render(main, args) || null;
  }
  // A new view is a new page for a screen reader: move focus to its heading, except on
  // the first load (the page starts at its top, skip link first) and when only the
  // list's query changed (focus stays in the search form).
  if (previousView && !(view === "list" && previousView === "list")) {
    const h1 = main.querySelector("h1");
    if (h1) { h1.setAttribute("tabindex", "-1"); h1.focus({ preventScroll: true }); }
  }
  previousView = view;
}

// The skip link must not become a route (#main): it moves the focus instead.
document.querySelector(".skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  main.focus();
});
window.addEventListener("hashchange", route);
route();
