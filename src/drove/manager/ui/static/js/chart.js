// A small line chart on a <canvas> (no library): a few series over time, its scale's top
// written in the corner, and the newest values as text beside it for screen readers.

import {h} from "./dom.js";

const COLOURS = ["#2563eb", "#d97706", "#059669"];

/** One chart: a title, a canvas and a live text summary. */
export class LineChart {
  /** series: [{key, label}], format: value -> text. */
  constructor(title, series, format) {
    this.series = series;
    this.format = format;
    this.canvas = h("canvas", {role: "img", "aria-label": title, height: 120});
    this.summary = h("p", {class: "chart-summary", "aria-live": "off"});
    this.legend = h("ul", {class: "legend"}, series.map((s, i) =>
      h("li", {style: {"--colour": COLOURS[i % COLOURS.length]}}, s.label)));
    this.el = h("figure", {class: "chart"},
      h("figcaption", {}, title), this.canvas, this.legend, this.summary);
  }

  /** Draw the points [{t, key: value...}]. */
  draw(points) {
    const latest = points[points.length - 1];
    this.summary.textContent = latest
      ? this.series.map((s) => `${s.label}: ${this.format(latest[s.key])}`).join(" · ")
      : "waiting for data…";
    const canvas = this.canvas;
    const width = canvas.parentElement?.clientWidth || 300;
    const ratio = window.devicePixelRatio || 1;
    const cssHeight = 120;
    canvas.style.width = "100%";
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.floor(width * ratio);
    canvas.height = Math.floor(cssHeight * ratio);
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.clearRect(0, 0, width, cssHeight);
    const style = getComputedStyle(document.body);
    ctx.strokeStyle = style.getPropertyValue("--grid").trim() || "#ddd";
    ctx.lineWidth = 1;
    for (const y of [0.25, 0.5, 0.75]) {
      ctx.beginPath();
      ctx.moveTo(0, cssHeight * y);
      ctx.lineTo(width, cssHeight * y);
      ctx.stroke();
    }
    if (points.length < 2) return;
    let top = 0;
    for (const p of points) for (const s of this.series) top = Math.max(top, p[s.key] || 0);
    top = top > 0 ? top * 1.1 : 1;
    const t0 = points[0].t;
    const span = Math.max(1, points[points.length - 1].t - t0);
    this.series.forEach((s, i) => {
      ctx.strokeStyle = COLOURS[i % COLOURS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      points.forEach((p, j) => {
        const x = ((p.t - t0) / span) * (width - 2) + 1;
        const y = cssHeight - 2 - ((p[s.key] || 0) / top) * (cssHeight - 16);
        if (j === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.stroke();
    });
    ctx.fillStyle = style.getPropertyValue("--muted").trim() || "#666";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillText(this.format(top), 4, 11);
  }
}

/** The three charts of a volume or of the total: IOPS, throughput, latency. */
export function ioCharts(formatCount, formatBytes) {
  const charts = [
    new LineChart("IOPS", [{key: "iops", label: "requests/s"}], formatCount),
    new LineChart("Throughput", [{key: "read", label: "read"}, {key: "write", label: "write"}],
      (v) => `${formatBytes(v)}/s`),
    new LineChart("Latency", [{key: "latency", label: "mean"}, {key: "p99", label: "p99"}],
      (v) => `${(v || 0).toFixed(2)} ms`),
  ];
  return {
    el: h("div", {class: "charts"}, charts.map((c) => c.el)),
    draw(points) {
      for (const c of charts) c.draw(points);
    },
  };
}
