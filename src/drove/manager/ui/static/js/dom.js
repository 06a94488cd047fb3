// Small DOM helpers: elements are built with text nodes only (never parsed HTML), so
// names and messages from the API can never inject markup.

/** Build an element: h("a", {href: "#/"}, "text", child...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "style" && typeof value === "object") {
      // Through the CSSOM: the page's CSP forbids style attributes.
      for (const [prop, v] of Object.entries(value)) el.style.setProperty(prop, v);
    } else if (key === "class") {
      el.className = value;
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (strings, numbers, nodes, nested arrays; null skipped). */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/**
 * Rebuild el's children only when key differs from the last one given: polling then
 * leaves a section untouched (and the keyboard focus in it) while its data is the same.
 */
export function renderIf(el, key, build) {
  const text = typeof key === "string" ? key : JSON.stringify(key);
  if (el.dataset.renderKey === text) return false;
  el.dataset.renderKey = text;
  fill(el, build());
  return true;
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/** 1536 -> "1.5 KiB". */
export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  let v = Number(n);
  let i = 0;
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)} ${UNITS[i]}`;
}

/** A rate with its unit: 1.2k, 3.4M (for IOPS). */
export function count(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return n >= 10 ? n.toFixed(0) : n.toFixed(1);
}

/** An ISO time as the browser's local date and time. */
export function time(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

/** A percentage of done/total as "42%". */
export function percent(done, total) {
  if (!total) return "0%";
  return `${Math.min(100, Math.floor((100 * done) / total))}%`;
}

/** A <progress> bar with a text label for screen readers and sighted users alike. */
export function progress(done, total, label) {
  return h("span", {class: "progress"},
    h("progress", {max: total || 1, value: done || 0, "aria-label": label}),
    h("span", {class: "progress-text"}, `${percent(done, total)} (${bytes(done)} of ${bytes(total)})`));
}

/** A coloured badge for a state or health word. */
export function badge(word) {
  return h("span", {class: `badge badge-${String(word).toLowerCase()}`}, String(word));
}
