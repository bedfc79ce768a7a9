// The image viewer: one series, images rendered by the archive (WADO-RS Retrieve
// Rendered, PS3.18 10.4.1.1.3), so every transfer syntax it stores can be read here.
// Scrolling walks the series' images in InstanceNumber order, and the frames of a
// multi-frame instance one by one. Window/level changes ask the server for a new
// rendering (?window=center,width); while dragging, an SVG filter previews it.

import { panel } from "./attrs.js";
import {
  DW, el, errorBox, first, getJSON, num, personName, query, searchAll, values,
} from "./dicom.js";
import { ImageLoader } from "./loader.js";

const PRESETS = [ // key, label, center, width (Hounsfield units, CT)
  ["1", "Soft tissue", 40, 400],
  ["2", "Lung", -600, 1500],
  ["3", "Bone", 300, 1500],
  ["4", "Brain", 40, 80],
];
const PREFETCH_AHEAD = 5;
const PREFETCH_BEHIND = 2;
const MAX_SIDE = 2048; // larger images are rendered scaled down to fit this square
const ZOOM_MIN = 0.25;
const ZOOM_MAX = 16;
const SETTLE_MS = 150; // metadata of the image shown once scrolling pauses
const WINDOW_DEBOUNCE_MS = 200; // re-render after a window drag ends

export function render(root, { study, series }) {
  const v = new Viewer(root, study, series);
  return () => v.destroy();
}

class Viewer {
  constructor(root, study, series) {
    this.study = study;
    this.series = series;
    this.base = `${DW}/studies/${encodeURIComponent(study)}/series/${encodeURIComponent(series)}`;
    this.items = []; // {sop, frame (0 = single-frame), frames, instanceIndex, rows, cols}
    this.instances = 0;
    this.cur = -1;
    this.token = 0;
    this.live = true;
    this.win = null; // null = the instance's own window ("auto"), else {c, w}
    this.shownWin = null; // the window of the image on screen (for the drag preview)
    this.view = { z: 1, x: 0, y: 0 };
    this.mode = "window"; // what a plain left drag does: "window" or "pan"
    this.playing = false;
    this.meta = new Map(); // sop -> promise of the instance's DICOM JSON
    this.metaState = { filter: "" };
    this.loader = new ImageLoader();
    this.build(root);
    this.load();
  }

  // ---- layout ------------------------------------------------------------------------

  build(root) {
    this.heading = el("h1", { class: "viewer-title" }, "Viewer");
    this.crumbStudy = el("a", { href: `#/study/${encodeURIComponent(this.study)}` }, "Study");
    const crumbs = el("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
      el("a", { href: "#/" }, "Studies"), " / ", this.crumbStudy, " / ",
      el("span", { "aria-current": "page" }, "Images"));

    // Another series opens on a pick with the mouse, or on Enter: arrow keys only move
    // the choice (a change of view on mere input would strand keyboard users, WCAG 3.2.2).
    const openSeries = () => {
      const uid = this.seriesSelect.value;
      if (uid && uid !== this.series) {
        location.hash = `#/viewer/${encodeURIComponent(this.study)}/${encodeURIComponent(uid)}`;
      }
    };
    let picked = false;
    this.seriesSelect = el("select", {
      id: "v-series", "aria-describedby": "v-series-hint",
      onpointerdown: () => { picked = true; },
      onkeydown: (ev) => {
        picked = false;
        if (ev.key === "Enter") { ev.preventDefault(); openSeries(); }
      },
      onchange: () => { if (picked) openSeries(); },
    });
    this.presetGroup = el("div", { class: "group", role: "group", "aria-label": "Window presets" });
    this.modeButtons = {
      window: el("button", { type: "button", "aria-pressed": "true", onclick: () => this.setMode("window"),
        title: "Drag adjusts window/level (W)" }, "Window"),
      pan: el("button", { type: "button", "aria-pressed": "false", onclick: () => this.setMode("pan"),
        title: "Drag pans (P); Shift+drag pans in any mode" }, "Pan"),
    };
    this.playButton = el("button", { type: "button", class: "play", "aria-pressed": "false",
      onclick: () => this.togglePlay(), title: "Play through the images and frames (Space)",
      hidden: true }, "▶ Play");
    this.attrButton = el("button", { type: "button", "aria-expanded": "true",
      "aria-controls": "v-attrs", onclick: () => this.toggleAttrs(), title: "Attributes (I)" },
    "Attributes");
    const toolbar = el("div", { class: "toolbar", "aria-label": "Image tools", role: "region" },
      el("div", { class: "field inline" }, el("label", { for: "v-series" }, "Series"), this.seriesSelect,
        el("span", { id: "v-series-hint", class: "sr-only" }, "Enter opens the chosen series")),
      this.presetGroup,
      el("div", { class: "group", role: "group", "aria-label": "Mouse drag" },
        this.modeButtons.window, this.modeButtons.pan),
      el("div", { class: "group", role: "group", "aria-label": "Zoom" },
        el("button", { type: "button", onclick: () => this.zoomBy(1 / 1.25), title: "Zoom out (−)",
          "aria-label": "Zoom out" }, "−"),
        el("button", { type: "button", onclick: () => this.zoomBy(1.25), title: "Zoom in (+)",
          "aria-label": "Zoom in" }, "+"),
        el("button", { type: "button", onclick: () => this.resetView(), title: "Fit to window (0)" }, "Fit")),
      this.playButton, this.attrButton);

    this.frame = el("div", { class: "frame" });
    this.ov = {
      tl: el("div", { class: "ov tl" }), tr: el("div", { class: "ov tr" }),
      bl: el("div", { class: "ov bl" }), br: el("div", { class: "ov br" }),
      msg: el("div", { class: "ov msg", role: "alert" }),
    };
    this.stage = el("div", {
      id: "stage", class: "stage", tabindex: "0", "aria-roledescription": "image viewport",
      "aria-label": "Image viewport",
      "aria-describedby": "v-help",
    }, this.frame, el("div", { class: "overlays", "aria-hidden": "true" },
      this.ov.tl, this.ov.tr, this.ov.bl, this.ov.br), this.ov.msg);
    this.slider = el("input", { id: "v-slider", type: "range", min: "1", max: "1", value: "1",
      step: "1", disabled: true });
    this.position = el("output", { id: "v-position", for: "v-slider", "aria-live": "polite" }, "");
    const scrub = el("div", { class: "scrub" },
      el("label", { for: "v-slider" }, "Image"), this.slider, this.position);
    const help = el("p", { id: "v-help", class: "help" },
      "Wheel, arrow keys or Page Up/Down: next or previous image. Drag: window/level ",
      "(Shift+drag or Pan mode: move). Ctrl+wheel or +/−: zoom; 0: fit. ",
      "Space: play. 1–4: CT presets, A: auto window.");

    this.attrs = panel(this.metaState);
    this.aside = el("aside", { id: "v-attrs", class: "side", "aria-labelledby": "v-attrs-h" },
      el("h2", { id: "v-attrs-h" }, "Attributes"), this.attrs.root);
    this.attrs.message("Loading…");

    const layout = el("div", { class: "viewer" },
      el("div", { class: "viewer-main" }, this.stage, scrub, help), this.aside);
    root.append(crumbs, this.heading, toolbar, layout);

    this.slider.addEventListener("input", () => this.show(Number(this.slider.value) - 1));
    this.onKey = (ev) => this.key(ev);
    document.addEventListener("keydown", this.onKey);
    this.stage.addEventListener("wheel", (ev) => this.wheel(ev), { passive: false });
    this.stage.addEventListener("pointerdown", (ev) => this.pointerDown(ev));
    this.stage.addEventListener("dblclick", () => this.resetView());
    this.stage.addEventListener("contextmenu", (ev) => ev.preventDefault());
    this.renderPresets("");
  }

  destroy() {
    this.live = false;
    this.playing = false;
    this.token += 1;
    document.removeEventListener("keydown", this.onKey);
    clearTimeout(this.metaTimer);
    clearTimeout(this.winTimer);
    this.loader.dropQueued();
  }

  // ---- data ---------------------------------------------------------------------------

  async load() {
    const sq = encodeURIComponent(this.study);
    getJSON(`${DW}/studies${query({ StudyInstanceUID: this.study })}`).then((found) => {
      if (!this.live || !found.length) return;
      const s = found[0];
      const name = personName(first(s, "00100010"));
      const desc = String(first(s, "00081030") || "Study");
      this.crumbStudy.textContent = desc;
      this.ov.tl.replaceChildren(el("div", {}, name), el("div", {}, first(s, "00100020")),
        el("div", {}, desc));
      this.patient = name;
    }).catch(() => {});
    getJSON(`${DW}/studies/${sq}/series`).then((list) => {
      if (!this.live) return;
      list.sort((a, b) => num(a, "00200011", 1e9) - num(b, "00200011", 1e9));
      this.seriesSelect.replaceChildren(...list.map((r) => {
        const uid = first(r, "0020000E");
        const label = [first(r, "00200011"), first(r, "00080060"), first(r, "0008103E")]
          .filter((x) => x !== "").join(" · ");
        return el("option", { value: uid, selected: uid === this.series }, label || uid);
      }));
      const mine = list.find((r) => first(r, "0020000E") === this.series);
      if (mine) {
        this.modality = String(first(mine, "00080060"));
        const desc = String(first(mine, "0008103E") || "(no description)");
        this.heading.textContent = `${desc} (${this.modality})`;
        document.title = `${desc} · ANIM archive`;
        this.ov.tr.replaceChildren(el("div", {}, desc),
          el("div", {}, `Series ${first(mine, "00200011")} · ${this.modality}`));
        this.renderPresets(this.modality);
      }
    }).catch(() => {});

    let instances;
    try {
      instances = await searchAll(`${this.base}/instances`, { includefield: "00280008" });
    } catch (err) {
      if (this.live) this.stage.replaceChildren(errorBox(err, "the images of this series"));
      return;
    }
    if (!this.live) return;
    instances.sort((a, b) => num(a, "00200013", 1e9) - num(b, "00200013", 1e9));
    this.instances = instances.length;
    instances.forEach((inst, i) => {
      const sop = String(first(inst, "00080018"));
      const frames = Math.max(1, num(inst, "00280008", 1));
      const rows = num(inst, "00280010", 0);
      const cols = num(inst, "00280011", 0);
      if (frames > 1) {
        for (let f = 1; f <= frames; f += 1) {
          this.items.push({ sop, frame: f, frames, instanceIndex: i, rows, cols });
        }
      } else {
        this.items.push({ sop, frame: 0, frames: 1, instanceIndex: i, rows, cols });
      }
    });
    if (!this.items.length) {
      this.ov.msg.textContent = "This series holds no images.";
      this.attrs.message("No image.");
      return;
    }
    this.slider.max = String(this.items.length);
    this.slider.disabled = this.items.length < 2;
    this.playButton.hidden = this.items.length < 2;
    this.stage.dataset.count = String(this.items.length);
    this.show(0);
  }

  url(item, win = this.win) {
    let u = `${this.base}/instances/${encodeURIComponent(item.sop)}`;
    if (item.frame) u += `/frames/${item.frame}`;
    const p = {};
    if (win) p.window = `${round(win.c)},${round(win.w)}`;
    if (item.cols > MAX_SIDE || item.rows > MAX_SIDE) p.viewport = `${MAX_SIDE},${MAX_SIDE}`;
    return `${u}/rendered${query(p)}`;
  }

  metadata(sop) {
    let m = this.meta.get(sop);
    if (!m) {
      m = getJSON(`${this.base}/instances/${encodeURIComponent(sop)}/metadata`)
        .then((list) => list[0] || {});
      m.catch(() => this.meta.delete(sop));
      this.meta.set(sop, m);
    }
    return m;
  }

  // ---- showing an image -------------------------------------------------------------

  async show(index) {
    if (!this.items.length) return;
    const n = this.items.length;
    this.cur = Math.min(n - 1, Math.max(0, index));
    const my = ++this.token;
    const item = this.items[this.cur];
    this.slider.value = String(this.cur + 1);
    const where = `Image ${item.instanceIndex + 1} of ${this.instances}` +
      (item.frame ? `, frame ${item.frame} of ${item.frames}` : "");
    this.slider.setAttribute("aria-valuetext", where);
    this.position.textContent = where;
    this.ov.br.textContent = `${this.cur + 1} / ${n}`;
    const url = this.url(item);
    try {
      const img = await this.loader.get(url, true);
      if (my !== this.token || !this.live) return;
      img.alt = `${where}${this.patient ? `, ${this.patient}` : ""}`;
      img.className = "image";
      this.frame.replaceChildren(img);
      this.shownWin = this.win;
      this.frame.classList.remove("previewing");
      this.ov.msg.textContent = "";
      this.stage.dataset.index = String(this.cur);
      this.stage.dataset.shown = url;
    } catch {
      if (my !== this.token || !this.live) return;
      this.frame.replaceChildren();
      this.ov.msg.textContent = "The archive could not render this image.";
      this.stage.dataset.shown = "";
    }
    this.showWindow();
    this.prefetch();
    clearTimeout(this.metaTimer);
    this.metaTimer = setTimeout(() => this.showMetadata(item, my), SETTLE_MS);
  }

  prefetch() {
    const n = this.items.length;
    const order = [];
    for (let k = 1; k <= PREFETCH_AHEAD; k += 1) order.push(this.cur + k);
    for (let k = 1; k <= PREFETCH_BEHIND; k += 1) order.push(this.cur - k);
    for (const i of order) if (i >= 0 && i < n) this.loader.get(this.url(this.items[i]));
  }

  async showMetadata(item, my) {
    try {
      const ds = await this.metadata(item.sop);
      if (my !== this.token || !this.live) return;
      this.attrs.show(ds);
      this.currentMeta = ds;
      // colour images have no window (PS3.4 N.2): a drag can only pan them
      const colour = this.isColour();
      this.modeButtons.window.disabled = colour;
      if (colour && this.mode === "window") this.setMode("pan");
      this.showWindow();
    } catch (err) {
      if (my === this.token && this.live) this.attrs.message(`Could not load the attributes: ${err.message}`);
    }
  }

  // ---- window / level ------------------------------------------------------------------

  // The window an "auto" image is shown with: the instance's own, else its value range.
  defaultWindow() {
    const ds = this.currentMeta || {};
    const c = values(ds, "00281050")[0];
    const w = values(ds, "00281051")[0];
    if (Number.isFinite(Number(c)) && Number(w) > 0) return { c: Number(c), w: Number(w) };
    const bits = num(ds, "00280101", 12);
    const slope = num(ds, "00281053", 1);
    const icpt = num(ds, "00281052", 0);
    const signed = num(ds, "00280103", 0) === 1;
    const lo = signed ? -(2 ** (bits - 1)) : 0;
    const hi = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
    return { c: icpt + slope * (lo + hi) / 2, w: Math.max(1, slope * (hi - lo)) };
  }

  isColour() {
    const pi = String(first(this.currentMeta || {}, "00280004"));
    return pi !== "" && !pi.startsWith("MONOCHROME");
  }

  renderPresets(modality) {
    const buttons = [el("button", { type: "button", "data-preset": "auto", title: "The image's own window (A)",
      onclick: () => this.setWindow(null) }, "Auto")];
    if (modality === "CT") {
      for (const [key, label, c, w] of PRESETS) {
        buttons.push(el("button", { type: "button", "data-preset": label.toLowerCase().replace(" ", "-"),
          title: `${label}: center ${c}, width ${w} (${key})`, onclick: () => this.setWindow({ c, w }) },
        label));
      }
    }
    this.presetGroup.replaceChildren(...buttons);
    this.markPreset();
  }

  markPreset() {
    for (const b of this.presetGroup.querySelectorAll("button")) {
      const p = PRESETS.find(([, label]) => label.toLowerCase().replace(" ", "-") === b.dataset.preset);
      const on = b.dataset.preset === "auto" ? this.win === null
        : Boolean(p && this.win && this.win.c === p[2] && this.win.w === p[3]);
      b.setAttribute("aria-pressed", String(on));
    }
  }

  setWindow(win) {
    this.win = win;
    this.markPreset();
    this.loader.dropQueued();
    this.show(this.cur);
  }

  showWindow(pending) {
    const w = pending || this.win;
    const text = w ? `W ${round(w.w)}  L ${round(w.c)}` : "Window: auto";
    this.ov.bl.textContent = `${text}  ·  Zoom ${Math.round(this.view.z * 100)}%`;
  }

  // Preview of a new window on the image rendered with the old one (PS3.4 C.11.2.1.2:
  // display = (x - (c - w/2)) / w), as a lookup table of the displayed value. Black and
  // white stay black and white: the old rendering clipped them, and what lies beyond
  // the old window (air, bone) mostly lies beyond the new one too.
  preview(next) {
    const old = this.shownWin || this.defaultWindow();
    const slope = old.w / next.w;
    const intercept = (old.c - next.c + (next.w - old.w) / 2) / next.w;
    const table = [];
    for (let i = 0; i <= 255; i += 1) {
      const y = i === 0 ? 0 : i === 255 ? 1 : slope * (i / 255) + intercept;
      table.push(Math.min(1, Math.max(0, y)).toFixed(4));
    }
    const values = table.join(" ");
    for (const f of document.querySelectorAll("#wl-preview feFuncR, #wl-preview feFuncG, #wl-preview feFuncB")) {
      f.setAttribute("tableValues", values);
    }
    this.frame.classList.add("previewing");
  }

  // ---- zoom and pan -----------------------------------------------------------------

  applyView() {
    const { z, x, y } = this.view;
    this.frame.style.transform = `translate(${x}px, ${y}px) scale(${z})`;
    this.showWindow();
  }

  // Zoom by factor around a point given relative to the stage's centre.
  zoomBy(factor, px = 0, py = 0) {
    const z = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, this.view.z * factor));
    const k = z / this.view.z;
    this.view = { z, x: px - (px - this.view.x) * k, y: py - (py - this.view.y) * k };
    this.applyView();
  }

  resetView() {
    this.view = { z: 1, x: 0, y: 0 };
    this.applyView();
  }

  setMode(mode) {
    this.mode = mode;
    for (const [m, b] of Object.entries(this.modeButtons)) b.setAttribute("aria-pressed", String(m === mode));
    this.stage.dataset.mode = mode;
  }

  // ---- input ------------------------------------------------------------------------

  wheel(ev) {
    ev.preventDefault();
    if (ev.ctrlKey || ev.metaKey) {
      const r = this.stage.getBoundingClientRect();
      const unit = ev.deltaMode === 1 ? 33 : ev.deltaMode === 2 ? 400 : 1;
      this.zoomBy(Math.exp(-ev.deltaY * unit * 0.002),
        ev.clientX - r.left - r.width / 2, ev.clientY - r.top - r.height / 2);
      return;
    }
    // a mouse notch (or a line/page) is one image; a touchpad's small deltas add up
    if (ev.deltaMode !== 0 || Math.abs(ev.deltaY) >= 50) {
      this.wheelRest = 0;
      this.step(Math.sign(ev.deltaY));
      return;
    }
    this.wheelRest = (this.wheelRest || 0) + ev.deltaY;
    if (Math.abs(this.wheelRest) >= 50) {
      this.step(Math.sign(this.wheelRest));
      this.wheelRest = 0;
    }
  }

  step(d) {
    if (this.items.length) this.show(this.cur + d);
  }

  pointerDown(ev) {
    if (ev.button !== 0 && ev.button !== 1) return;
    ev.preventDefault();
    this.stage.focus({ preventScroll: true });
    const pan = ev.button === 1 || ev.shiftKey || this.mode === "pan" || this.isColour();
    const start = { x: ev.clientX, y: ev.clientY, view: { ...this.view } };
    const from = this.win || this.shownWin || this.defaultWindow();
    const rate = Math.max(from.w, 1) / 256; // one pixel of drag: 1/256 of the window
    let pending = null;
    this.stage.setPointerCapture(ev.pointerId);
    this.stage.classList.add("dragging");
    const move = (e) => {
      const dx = e.clientX - start.x;
      const dy = e.clientY - start.y;
      if (pan) {
        this.view = { ...start.view, x: start.view.x + dx, y: start.view.y + dy };
        this.applyView();
        return;
      }
      // right: wider window (less contrast); down: higher centre (darker)
      pending = { c: from.c + dy * rate, w: Math.max(1, from.w + dx * rate) };
      this.preview(pending);
      this.showWindow(pending);
    };
    const up = () => {
      this.stage.removeEventListener("pointermove", move);
      this.stage.removeEventListener("pointerup", up);
      this.stage.removeEventListener("pointercancel", up);
      this.stage.classList.remove("dragging");
      if (pending) {
        this.win = { c: round(pending.c), w: round(pending.w) };
        this.markPreset();
        clearTimeout(this.winTimer);
        this.winTimer = setTimeout(() => { this.loader.dropQueued(); this.show(this.cur); },
          WINDOW_DEBOUNCE_MS);
      }
    };
    this.stage.addEventListener("pointermove", move);
    this.stage.addEventListener("pointerup", up);
    this.stage.addEventListener("pointercancel", up);
  }

  key(ev) {
    const t = ev.target;
    if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
    if (t instanceof HTMLElement && (t.isContentEditable || /^(INPUT|SELECT|TEXTAREA)$/.test(t.tagName))) {
      return; // the slider, the series list and the filter box keep their own keys
    }
    const onButton = t instanceof HTMLElement && (t.tagName === "BUTTON" || t.tagName === "A");
    const preset = PRESETS.find(([k]) => k === ev.key);
    let handled = true;
    switch (ev.key) {
      case "ArrowDown": case "ArrowRight": case "PageDown": case "j": this.step(1); break;
      case "ArrowUp": case "ArrowLeft": case "PageUp": case "k": this.step(-1); break;
      case "Home": this.show(0); break;
      case "End": this.show(this.items.length - 1); break;
      case "+": case "=": this.zoomBy(1.25); break;
      case "-": case "_": this.zoomBy(1 / 1.25); break;
      case "0": this.resetView(); break;
      case "a": case "A": this.setWindow(null); break;
      case "w": case "W": this.setMode("window"); break;
      case "p": case "P": this.setMode("pan"); break;
      case "i": case "I": this.toggleAttrs(); break;
      case " ":
        if (onButton) { handled = false; break; }
        this.togglePlay();
        break;
      default:
        if (preset && this.modality === "CT") this.setWindow({ c: preset[2], w: preset[3] });
        else handled = false;
    }
    if (handled) ev.preventDefault();
  }

  toggleAttrs() {
    const open = this.aside.hidden;
    this.aside.hidden = !open;
    this.attrButton.setAttribute("aria-expanded", String(open));
  }

  // ---- cine -------------------------------------------------------------------------

  async togglePlay() {
    if (this.items.length < 2) return;
    this.playing = !this.playing;
    this.playButton.setAttribute("aria-pressed", String(this.playing));
    this.playButton.textContent = this.playing ? "❚❚ Pause" : "▶ Play";
    if (!this.playing) return;
    const meta = await this.metadata(this.items[this.cur].sop).catch(() => ({}));
    const frameTime = num(meta, "00181063", 0);
    const delay = frameTime > 0 ? Math.min(1000, Math.max(20, frameTime)) : 100;
    while (this.playing && this.live) {
      const t0 = performance.now();
      await this.show((this.cur + 1) % this.items.length);
      await new Promise((r) => setTimeout(r, Math.max(0, delay - (performance.now() - t0))));
    }
  }
}

function round(x) {
  return Math.round(x * 100) / 100;
}
