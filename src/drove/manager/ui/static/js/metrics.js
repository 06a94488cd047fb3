// Live I/O figures from the manager's Prometheus endpoint (GET /metrics): the counters
// are read every poll and turned into rates over the interval between two reads.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
const KEEP = 90; // points kept per series (3 minutes at one poll every 2 s)

/** Parse Prometheus text into [{name, labels, value}]. */
export function parse(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(LABEL)) {
      labels[key] = value.replace(/\\"/g, '"').replace(/\\n/g, "\n").replace(/\\\\/g, "\\");
    }
    samples.push({name: m[1], labels, value: Number(m[3])});
  }
  return samples;
}

/** The counters the rates are made of, per volume: {volume: {key: value}}. */
function counters(samples) {
  const out = {};
  const add = (volume, key, value) => {
    const v = (out[volume] ??= {});
    v[key] = (v[key] ?? 0) + value;
  };
  for (const {name, labels, value} of samples) {
    const volume = labels.volume;
    if (volume === undefined) continue;
    if (name === "drove_volume_ops_total") add(volume, "ops", value);
    else if (name === "drove_volume_bytes_total" && labels.op === "read") add(volume, "rbytes", value);
    else if (name === "drove_volume_bytes_total" && labels.op === "write") add(volume, "wbytes", value);
    else if (name === "drove_volume_latency_seconds_sum") add(volume, "lsum", value);
    else if (name === "drove_volume_latency_seconds_count") add(volume, "lcount", value);
    else if (name === "drove_volume_latency_seconds_bucket") {
      // Per op: [[upper bound in s, cumulative count]] (the engine lists only the bounds
      // its requests reached, so two ops' bounds differ).
      const hist = ((out[volume] ??= {}).hist ??= {});
      (hist[labels.op] ??= []).push([labels.le === "+Inf" ? Infinity : Number(labels.le), value]);
    }
  }
  return out;
}

/** A cumulative histogram's count at ``x``: that of its largest bound at or below it. */
function cumulativeAt(buckets, x) {
  let c = 0;
  for (const [le, n] of buckets) if (le <= x && n > c) c = n;
  return c;
}

/**
 * The ``q`` quantile, in ms, of the requests that ended between two scrapes (``now`` and
 * ``before``: {series: buckets}), as the upper bound of its bucket; 0 without requests.
 */
export function quantile(now, before, q) {
  const keys = Object.keys(now ?? {});
  const delta = (x) => keys.reduce((sum, k) =>
    sum + cumulativeAt(now[k], x) - cumulativeAt(before?.[k] ?? [], x), 0);
  const total = delta(Infinity);
  if (total <= 0) return 0;
  const bounds = [...new Set(keys.flatMap((k) => now[k].map(([le]) => le)))]
    .filter(Number.isFinite).sort((a, b) => a - b);
  for (const le of bounds) if (delta(le) >= q * total) return le * 1000;
  return bounds.length ? bounds[bounds.length - 1] * 1000 : 0; // past the last bound
}

/** One point of a volume's (or the total's) rates. */
function rates(now, before, seconds) {
  const d = (key) => Math.max(0, (now[key] ?? 0) - (before[key] ?? 0));
  const calls = d("lcount");
  return {
    iops: d("ops") / seconds,
    read: d("rbytes") / seconds,
    write: d("wbytes") / seconds,
    // Mean latency of the requests that ended in the interval, in milliseconds.
    latency: calls ? (1000 * d("lsum")) / calls : 0,
    p99: quantile(now.hist, before.hist, 0.99),
  };
}

/** The history of rates per volume and in total, fed one metrics text per poll. */
export class History {
  constructor() {
    this.last = null; // {t, counters}
    this.series = {}; // volume or "" (total) -> [{t, iops, read, write, latency, p99}]
  }

  /** Take one scrape at time t (ms); a volume whose counters went back (engine restart)
   *  starts afresh. */
  add(text, t = Date.now()) {
    const now = counters(parse(text));
    const total = {hist: {}};
    for (const [volume, c] of Object.entries(now)) {
      for (const [k, v] of Object.entries(c)) {
        if (k !== "hist") total[k] = (total[k] ?? 0) + v;
      }
      // Each volume's ops stay apart: their bounds differ.
      for (const [op, b] of Object.entries(c.hist ?? {})) total.hist[`${volume}/${op}`] = b;
    }
    now[""] = total;
    if (this.last) {
      const seconds = Math.max(0.001, (t - this.last.t) / 1000);
      for (const [volume, c] of Object.entries(now)) {
        const before = this.last.counters[volume];
        if (!before || (c.ops ?? 0) < (before.ops ?? 0)) continue;
        const list = (this.series[volume] ??= []);
        list.push({t, ...rates(c, before, seconds)});
        if (list.length > KEEP) list.splice(0, list.length - KEEP);
      }
    }
    this.last = {t, counters: now};
  }

  /** The points of a volume ("" for the total). */
  of(volume = "") {
    return this.series[volume] ?? [];
  }

  /** The newest point of a volume, or null. */
  latest(volume = "") {
    const list = this.of(volume);
    return list.length ? list[list.length - 1] : null;
  }
}
