// The dashboard: cluster health, nodes with their disks, volumes with their replicas,
// and the total I/O charts.

import {ioCharts} from "./chart.js";
import {formDialog} from "./dialogs.js";
import {badge, bytes, count, h, renderIf} from "./dom.js";
import {actualSize, diskUse, replicaLine, table, volumeLink} from "./volumes.js";

/** Cluster health in one word: the worst of the volumes' and the nodes'. */
function clusterHealth(volumes, nodes) {
  if (volumes.some((v) => v.health === "faulted")) return "faulted";
  if (volumes.some((v) => v.health === "degraded") || nodes.some((n) => n.state !== "up")) {
    return "degraded";
  }
  return "healthy";
}

const SPACE_EVERY_MS = 15000; // a volume's actual size is asked for at most this often
const SPACE_AT_ONCE = 4; // volumes asked per refresh (each asks every replica)

/** The dashboard view. */
export function dashboardView({api, activity, history, go}) {
  const spaces = new Map(); // volume -> {at, space}: actual sizes, fetched in the background
  const health = h("section", {class: "summary", "aria-labelledby": "health-title"});
  const charts = ioCharts(count, bytes);
  const nodes = h("section", {"aria-label": "Nodes"});
  const volumes = h("section", {"aria-label": "Volumes"});
  const createButton = api.can("operator")
    ? h("button", {type: "button", class: "primary", onclick: () => createVolume()},
      "Create volume")
    : null;

  async function createVolume() {
    const v = await formDialog({
      title: "Create a volume", submitLabel: "Create",
      fields: [
        {name: "name", label: "Name", required: true, pattern: "[a-z0-9._\\-]{1,63}",
          help: "a-z 0-9 . _ -, up to 63 characters"},
        {name: "size", label: "Size", required: true, value: "1G", help: "e.g. 512M, 10G"},
        {name: "replicas", label: "Replicas", type: "number", min: 1, max: 10,
          help: "empty: the default setting"},
        {name: "data_locality", label: "Data locality", type: "select", value: "",
          options: [{value: "", label: "default setting"}, {value: "best-effort"},
            {value: "disabled"}, {value: "strict-local"}]},
        {name: "pool", label: "Pool (disk tag)", help: "empty: any disk"},
      ],
    });
    if (!v) return;
    const body = {name: v.name, size: v.size};
    if (v.replicas) body.replicas = Number(v.replicas);
    if (v.data_locality) body.data_locality = v.data_locality;
    if (v.pool) body.pool = v.pool;
    const made = await activity.run(`Create volume ${v.name}`, () => api.post("/v1/volumes", body));
    if (made) go(`#/volumes/${encodeURIComponent(made.name)}`);
  }

  const el = h("div", {class: "dashboard"},
    h("div", {class: "page-head"}, h("h1", {}, "Dashboard"), createButton),
    health,
    h("section", {"aria-labelledby": "io-title"}, h("h2", {id: "io-title"}, "I/O, all volumes"),
      charts.el),
    volumes, nodes);

  /** Ask the oldest-known volumes' actual sizes, without waiting (shown next refresh). */
  function fetchSpaces(vols) {
    const now = Date.now();
    const due = vols.filter((v) => now - (spaces.get(v.name)?.at ?? 0) > SPACE_EVERY_MS)
      .sort((a, b) => (spaces.get(a.name)?.at ?? 0) - (spaces.get(b.name)?.at ?? 0))
      .slice(0, SPACE_AT_ONCE);
    for (const v of due) {
      const known = spaces.get(v.name);
      spaces.set(v.name, {at: now, space: known?.space ?? null});
      api.get(`/v1/volumes/${encodeURIComponent(v.name)}?space=true`)
        .then((full) => spaces.set(v.name, {at: now, space: full.space ?? null}))
        .catch(() => {});
    }
  }

  function render(vols, nds) {
    const word = clusterHealth(vols, nds);
    const byHealth = (x) => vols.filter((v) => v.health === x).length;
    const up = nds.filter((n) => n.state === "up").length;
    renderIf(health, {word, vols: vols.map((v) => v.health), nds: nds.map((n) => n.state)},
      () => [
        h("h2", {id: "health-title"}, "Cluster health: ", badge(word)),
        h("ul", {class: "stats"},
          h("li", {}, h("strong", {}, String(vols.length)), " volumes"),
          h("li", {}, h("strong", {}, String(byHealth("healthy"))), " healthy"),
          h("li", {}, h("strong", {}, String(byHealth("degraded"))), " degraded"),
          h("li", {}, h("strong", {}, String(byHealth("faulted"))), " faulted"),
          h("li", {}, h("strong", {}, `${up}/${nds.length}`), " nodes up")),
      ]);
    const actual = (v) => actualSize(spaces.get(v.name)?.space);
    renderIf(volumes, vols.map((v) => [v.name, v.state, v.health, v.size, actual(v),
      v.node, v.replicas]), () => [
      h("h2", {}, "Volumes"),
      table("Volumes, their health and replicas",
        ["Name", "State", "Health", "Size", "Actual size", "Attached on", "Replicas", "I/O now"],
        vols.map((v) => [volumeLink(v.name), badge(v.state), badge(v.health), bytes(v.size),
          bytes(actual(v)), v.node ?? "–",
          h("ul", {class: "replicas"}, v.replicas.map(replicaLine)),
          h("span", {"data-io": v.name}, "–")]),
        "no volumes yet"),
    ]);
    renderIf(nodes, nds, () => [
      h("h2", {}, "Nodes"),
      table("Nodes and their disks", ["Name", "State", "Zone", "Role", "Disks"],
        nds.map((n) => [n.name, h("span", {}, badge(n.state),
          n.cordoned ? h("span", {class: "tag"}, "cordoned") : null),
        n.zone ?? "–", n.role,
        h("ul", {class: "disks"}, (n.disks ?? []).map((d) => h("li", {}, diskUse(d))))])),
    ]);
  }

  return {
    el,
    async refresh() {
      const [vols, nds] = await Promise.all([api.get("/v1/volumes"), api.get("/v1/nodes")]);
      render(vols, nds);
      fetchSpaces(vols);
    },
    draw() {
      charts.draw(history.of(""));
      // Only these cells change at every poll: the table is not rebuilt (focus stays).
      for (const cell of volumes.querySelectorAll("[data-io]")) {
        const p = history.latest(cell.dataset.io);
        cell.textContent = p
          ? `${count(p.iops)} IOPS, ${bytes(p.read + p.write)}/s, ${p.latency.toFixed(2)} ms`
          : "–";
      }
    },
  };
}
