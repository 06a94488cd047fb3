// How volumes, replicas and nodes read in tables: shared by the dashboard and the
// volume page.

import {badge, bytes, h, progress} from "./dom.js";

/**
 * The bytes a volume's data takes on its disks (all replicas), from its ``space`` (GET
 * /v1/volumes/NAME?space=true); null when not known.
 */
export function actualSize(space) {
  const values = (space?.replicas ?? []).map((r) => r.actual).filter((x) => typeof x === "number");
  return values.length ? values.reduce((a, b) => a + b, 0) : null;
}

/** A replica's actual size on its disk, from the volume's ``space``; null when not known. */
export function replicaActual(space, replica) {
  const row = (space?.replicas ?? []).find((r) => r.replica === replica);
  return typeof row?.actual === "number" ? row.actual : null;
}

/** A link to a volume's page. */
export function volumeLink(name) {
  return h("a", {href: `#/volumes/${encodeURIComponent(name)}`}, name);
}

/** One replica in a line: name, node/disk, mode, rebuild progress. */
export function replicaLine(r) {
  return h("li", {class: "replica", "data-replica": r.name},
    h("span", {class: "mono"}, r.name), " ",
    h("span", {class: "muted"}, `${r.node ?? "?"}/${r.disk}`), " ",
    badge(r.mode), r.local ? h("span", {class: "tag"}, "local") : null,
    r.rebuild ? h("span", {class: "rebuild"}, " rebuilding ",
      progress(r.rebuild.done, r.rebuild.total, `rebuild of ${r.name}`)) : null,
    r.error ? h("span", {class: "error"}, ` ${r.error}`) : null);
}

/** A table with a caption, column heads and rows (arrays of cells). */
export function table(caption, heads, rows, empty = "none") {
  return h("div", {class: "table-wrap"}, h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, heads.map((x) => h("th", {scope: "col"}, x)))),
    h("tbody", {}, rows.length
      ? rows.map((cells) => h("tr", {}, cells.map((c, i) =>
        i === 0 ? h("th", {scope: "row"}, c) : h("td", {}, c))))
      : h("tr", {}, h("td", {colspan: heads.length, class: "muted"}, empty)))));
}

/** A disk's use: a bar of capacity less available, and what is scheduled on it. */
export function diskUse(d) {
  const used = Math.max(0, (d.capacity ?? 0) - (d.available ?? 0));
  return h("span", {class: "disk"},
    h("span", {class: "mono"}, d.name), " ", badge(d.state), " ",
    h("meter", {min: 0, max: d.capacity || 1, value: used, "aria-label": `use of disk ${d.name}`}),
    ` ${bytes(used)} used of ${bytes(d.capacity)}, ${bytes(d.scheduled)} scheduled`);
}
