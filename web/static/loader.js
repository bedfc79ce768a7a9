// Rendered images, loaded a few at a time and kept for re-use (scrolling back is free).
// A load once started is never cancelled: a cancelled request is noise in the network
// log and wasted server work; the answer of a stale request is simply not shown.

const MAX_PARALLEL = 4;
const KEEP = 96; // decoded images kept; a few MB for typical CT and MR slices

export class ImageLoader {
  constructor() {
    this.entries = new Map(); // url -> {promise, resolve, reject, state}
    this.queue = [];
    this.active = 0;
  }

  // A promise of the loaded <img> for url; urgent ones go ahead of the prefetches.
  get(url, urgent = false) {
    let e = this.entries.get(url);
    if (e) {
      this.entries.delete(url); // most recently used last
      this.entries.set(url, e);
      if (urgent && e.state === "queued") {
        this.queue = this.queue.filter((x) => x !== e);
        this.queue.unshift(e);
      }
      return e.promise;
    }
    e = { url, state: "queued" };
    e.promise = new Promise((resolve, reject) => { e.resolve = resolve; e.reject = reject; });
    e.promise.catch(() => {}); // a prefetch nobody waits for must not be an unhandled rejection
    this.entries.set(url, e);
    if (urgent) this.queue.unshift(e); else this.queue.push(e);
    this.pump();
    this.trim();
    return e.promise;
  }

  // Forget prefetches not started yet (the window changed: they would be stale).
  dropQueued() {
    for (const e of this.queue) {
      this.entries.delete(e.url);
      e.reject(new Error("dropped"));
    }
    this.queue = [];
  }

  pump() {
    while (this.active < MAX_PARALLEL && this.queue.length) this.start(this.queue.shift());
  }

  start(e) {
    this.active += 1;
    e.state = "loading";
    const img = new Image();
    img.decoding = "async";
    const done = (ok) => {
      this.active -= 1;
      if (ok) {
        e.state = "done";
        e.resolve(img);
      } else {
        e.state = "failed";
        this.entries.delete(e.url);
        e.reject(new Error(`could not load ${e.url}`));
      }
      this.pump();
    };
    img.onload = () => { img.decode().then(() => done(true), () => done(true)); };
    img.onerror = () => done(false);
    img.src = e.url;
  }

  trim() {
    if (this.entries.size <= KEEP) return;
    for (const [url, e] of this.entries) {
      if (this.entries.size <= KEEP) break;
      if (e.state === "done") this.entries.delete(url);
    }
  }
}
