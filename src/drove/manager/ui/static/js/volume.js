// One volume's page: its state, replicas, snapshot tree, clones, backups, jobs, events
// and charts, and the actions the user's role allows.

import {backupTable} from "./backupactions.js";
import {ioCharts} from "./chart.js";
import {confirmDialog, formDialog} from "./dialogs.js";
import {badge, bytes, count, h, progress, renderIf, time} from "./dom.js";
import {actualSize, replicaActual, table, volumeLink} from "./volumes.js";

const SLOW_EVERY = 5; // backups and jobs are fetched every 5th refresh only

const q = encodeURIComponent;

/** The volume page of ``name``. */
export function volumeView({api, activity, history, go}, name) {
  const base = `/v1/volumes/${q(name)}`;
  const canAct = api.can("operator");
  let current = null; // the newest volume view
  let space = null; // its space (actual sizes), fetched on the slow refreshes
  let snapshots = [];
  let refreshes = 0;

  const toolbar = h("div", {class: "toolbar", role: "group", "aria-label": "Volume actions"});
  const details = h("section", {"aria-label": "Details"});
  const replicas = h("section", {"aria-label": "Replicas"});
  const charts = ioCharts(count, bytes);
  const tree = h("section", {"aria-label": "Snapshots"});
  const clones = h("section", {"aria-label": "Clones"});
  const backups = h("section", {"aria-label": "Backups"});
  const jobs = h("section", {"aria-label": "Recurring jobs"});
  const tasks = h("section", {"aria-label": "Running tasks"});
  const events = h("section", {"aria-label": "Events"});
  const title = h("h1", {}, "Volume ", h("span", {class: "mono"}, name));

  const el = h("div", {class: "volume-page"},
    h("p", {}, h("a", {href: "#/"}, "← Dashboard")),
    h("div", {class: "page-head"}, title), toolbar, details, replicas, tasks,
    h("section", {"aria-labelledby": "vio-title"}, h("h2", {id: "vio-title"}, "I/O"), charts.el),
    tree, clones, backups, jobs, events);

  // ------------------------------------------------------------------ actions

  const act = (label, fn) => activity.run(label, fn);

  async function attach() {
    const nodes = await api.get("/v1/nodes").catch(() => []);
    const choices = nodes.filter((n) => n.role !== "storage");
    const v = await formDialog({
      title: `Attach ${name}`, submitLabel: "Attach",
      fields: [
        {name: "node", label: "Node", type: "select", value: "",
          options: [{value: "", label: "the manager's own node"},
            ...choices.map((n) => ({value: n.name, label: `${n.name} (${n.state})`}))]},
        {name: "mount", label: "Mount path (optional)",
          help: "absolute path; a filesystem is made only if the volume is blank"},
      ],
    });
    if (!v) return;
    const body = {};
    if (v.node) body.node = v.node;
    if (v.mount) body.mount = v.mount;
    await act(`Attach ${name}`, () => api.post(`${base}/attach`, body));
  }

  async function detach() {
    const mounted = current?.mountpoint;
    const ok = await confirmDialog({
      title: `Detach ${name}?`, confirmLabel: `Detach ${name}`, danger: false,
      message: mounted
        ? `Its filesystem at ${mounted} is unmounted; clients connected to its NBD export are cut off.`
        : "Clients connected to its NBD export are cut off.",
    });
    if (ok) await act(`Detach ${name}`, () => api.post(`${base}/detach`, {}));
  }

  async function expand() {
    const v = await formDialog({
      title: `Expand ${name}`, submitLabel: "Expand",
      note: `Now ${bytes(current?.size)}. A volume only grows.`,
      fields: [{name: "size", label: "New size", required: true, help: "e.g. 20G"}],
    });
    if (v) await act(`Expand ${name}`, () => api.post(`${base}/expand`, {size: v.size}));
  }

  async function update() {
    const v = await formDialog({
      title: `Replicas and data locality of ${name}`, submitLabel: "Apply",
      note: "Applied live: new replicas are rebuilt while I/O goes on.",
      fields: [
        {name: "replicas", label: "Replicas", type: "number", min: 1, max: 10,
          value: current?.replica_count},
        {name: "data_locality", label: "Data locality", type: "select",
          value: current?.data_locality,
          options: [{value: "best-effort"}, {value: "disabled"}, {value: "strict-local"}]},
      ],
    });
    if (!v) return;
    const body = {};
    if (v.replicas && Number(v.replicas) !== current?.replica_count) {
      body.replicas = Number(v.replicas);
    }
    if (v.data_locality && v.data_locality !== current?.data_locality) {
      body.data_locality = v.data_locality;
    }
    if (Object.keys(body).length === 0) return;
    if (body.replicas < current?.replica_count && !(await confirmDialog({
      title: `Remove replicas of ${name}?`, confirmLabel: "Remove replicas",
      message: `From ${current.replica_count} to ${body.replicas} copies: the removed ` +
        "replicas' data is deleted.",
    }))) return;
    await act(`Update ${name}`, () => api.patch(base, body));
  }

  async function snapshot() {
    const v = await formDialog({
      title: `Snapshot ${name}`, submitLabel: "Take snapshot",
      fields: [{name: "name", label: "Snapshot name (optional)",
        help: "empty: snap-DATE-TIME"}],
    });
    if (!v) return;
    await act(`Snapshot ${name}`, () => api.post(`${base}/snapshots`,
      v.name ? {name: v.name} : {}));
  }

  async function clone(fromSnapshot = null) {
    const named = snapshots.filter((s) => !s.head);
    const v = await formDialog({
      title: `Clone ${name}`, submitLabel: "Clone",
      fields: [
        {name: "name", label: "New volume name", required: true},
        {name: "snapshot", label: "From snapshot", type: "select", value: fromSnapshot ?? "",
          options: [{value: "", label: "a new snapshot, now"},
            ...named.map((s) => ({value: s.name}))]},
        {name: "full", label: "Full copy (flatten it in the background)", type: "checkbox"},
      ],
    });
    if (!v) return;
    const body = {name: v.name, full: v.full};
    if (v.snapshot) body.snapshot = v.snapshot;
    const made = await act(`Clone ${name} to ${v.name}`, () => api.post(`${base}/clone`, body));
    if (made && !made.task) go(`#/volumes/${q(made.name)}`);
  }

  async function backup(fromSnapshot = null) {
    const named = snapshots.filter((s) => !s.head);
    const v = await formDialog({
      title: `Back up ${name}`, submitLabel: "Back up",
      fields: [{name: "snapshot", label: "Snapshot", type: "select", value: fromSnapshot ?? "",
        options: [{value: "", label: "a new snapshot, now"},
          ...named.map((s) => ({value: s.name}))]}],
    });
    if (!v) return;
    await act(`Back up ${name}`, () => api.post(`${base}/backups`,
      v.snapshot ? {snapshot: v.snapshot} : {}));
  }

  async function revert(snap) {
    const ok = await confirmDialog({
      title: `Revert ${name} to ${snap}?`, confirmLabel: `Revert to ${snap}`,
      message: `Everything written to ${name} since snapshot ${snap} is lost ` +
        "(take a snapshot first to keep it). No client may be connected.",
    });
    if (ok) await act(`Revert ${name} to ${snap}`, () => api.post(`${base}/revert`, {snapshot: snap}));
  }

  async function deleteSnapshot(snap, frees = null) {
    const ok = await confirmDialog({
      title: `Delete snapshot ${snap}?`, confirmLabel: `Delete snapshot ${snap}`,
      message: `Snapshot ${snap} of ${name} can no longer be reverted to, cloned or backed up` +
        `${frees !== null ? `; deleting it frees ${bytes(frees)}` : ""}.`,
    });
    if (ok) {
      await act(`Delete snapshot ${snap}`, () => api.del(`${base}/snapshots/${q(snap)}`));
    }
  }

  async function flatten() {
    await act(`Flatten ${name}`, () => api.post(`${base}/flatten`));
  }

  async function deleteVolume() {
    const ok = await confirmDialog({
      title: `Delete volume ${name}?`, confirmLabel: `Delete ${name}`,
      message: `Every replica and snapshot of ${name} is deleted; this cannot be undone ` +
        "(backups stay on the backup target).",
    });
    if (!ok) return;
    const done = await act(`Delete ${name}`, () => api.del(base));
    if (done) go("#/");
  }

  const button = (label, fn, cls = "") =>
    h("button", {type: "button", class: cls, onclick: () => fn()}, label);

  function renderToolbar(v) {
    if (!canAct) return;
    renderIf(toolbar, [v.state, !!v.clone_of, v.standby ? 1 : 0], () => [
      v.state === "attached" ? button("Detach", detach) : button("Attach", attach),
      button("Snapshot", snapshot),
      button("Clone", () => clone()),
      v.state === "attached" ? button("Back up", () => backup()) : null,
      button("Expand", expand),
      button("Replicas & locality", update),
      v.clone_of ? button("Flatten", flatten) : null,
      button("Delete", deleteVolume, "danger"),
    ]);
  }

  // ------------------------------------------------------------------ sections

  function renderDetails(v) {
    const rows = [
      ["State", badge(v.state)], ["Health", badge(v.health)], ["Size", bytes(v.size)],
      ["Actual size", space ? `${bytes(actualSize(space))} on ${space.replicas.length} disk(s)`
        : "–"],
      ["Replicas wanted", String(v.replica_count)], ["Data locality", v.data_locality],
      ["Attached on", v.node ?? "–"], ["NBD", v.nbd_uri ?? "–"],
      ["Device", v.device ? `${v.device} at ${v.mountpoint ?? "–"} (${v.fs ?? "?"})` : "–"],
      ["Engine", v.engine ? `pid ${v.engine.pid}, epoch ${v.engine.epoch ?? "?"}` : "–"],
      ["Encryption", v.encryption ? "AES-XTS-256" : "none"],
      ["Labels", Object.entries(v.labels ?? {}).map(([k, x]) => `${k}=${x}`).join(", ") || "–"],
      ["Created", time(v.created)],
    ];
    renderIf(details, rows.map((r) => [r[0], typeof r[1] === "string" ? r[1] : r[1].textContent]),
      () => h("dl", {class: "details"}, rows.map(([k, x]) => [h("dt", {}, k), h("dd", {}, x)])));
  }

  function renderReplicas(v) {
    renderIf(replicas, [v.replicas, v.rebuild, space?.replicas], () => [
      h("h2", {}, "Replicas"),
      v.rebuild ? h("p", {class: "rebuild-line"}, `Rebuilding ${v.rebuild.replica}: `,
        progress(v.rebuild.done, v.rebuild.total, `rebuild of ${v.rebuild.replica}`)) : null,
      table("Replicas", ["Name", "Node", "Disk", "Mode", "State", "Process", "Actual size",
        "Rebuild", "Error"],
      v.replicas.map((r) => [h("span", {class: "mono"}, r.name), r.node ?? "–", r.disk,
        badge(r.mode), r.state,
        v.state !== "attached" ? "–" : (r.local ? "in the engine" : (r.pid ? `pid ${r.pid}` : "–")),
        bytes(replicaActual(space, r.name)),
        r.rebuild ? progress(r.rebuild.done, r.rebuild.total, `rebuild of ${r.name}`) : "–",
        r.error ?? ""])),
    ]);
  }

  function snapshotItem(s, byName) {
    // From the manager's space report where it gives one: data held, what deleting frees.
    const data = s.data ?? s.size;
    const frees = typeof s.freed_by_delete === "number" ? s.freed_by_delete : null;
    // Revert, backup and delete need the engine: offered while the volume is attached.
    const attached = current?.state === "attached";
    const actions = canAct && !s.head ? h("span", {class: "snap-actions"},
      attached ? h("button", {type: "button", class: "small", onclick: () => revert(s.name),
        "aria-label": `Revert to ${s.name}`}, "Revert") : null,
      h("button", {type: "button", class: "small", onclick: () => clone(s.name),
        "aria-label": `Clone from ${s.name}`}, "Clone"),
      attached ? h("button", {type: "button", class: "small",
        onclick: () => backup(s.name), "aria-label": `Back up ${s.name}`}, "Back up") : null,
      attached ? h("button", {type: "button", class: "small danger",
        onclick: () => deleteSnapshot(s.name, frees), "aria-label": `Delete snapshot ${s.name}`},
      "Delete") : null) : null;
    const children = (s.children ?? []).map((c) => byName[c]).filter(Boolean);
    return h("li", {"data-snapshot": s.name},
      h("span", {class: "snap"},
        h("span", {class: "mono"}, s.head ? "head (live data)" : s.name),
        h("span", {class: "muted"},
          ` ${bytes(data)} data${frees !== null ? `, deleting frees ${bytes(frees)}` : ""}` +
          `${s.created ? `, ${time(s.created)}` : ""}`),
        actions),
      s.why && !s.head ? h("small", {class: "why muted"}, s.why) : null,
      children.length ? h("ul", {}, children.map((c) => snapshotItem(c, byName))) : null);
  }

  function renderTree(list) {
    renderIf(tree, [list, current?.state], () => {
      const byName = Object.fromEntries(list.map((s) => [s.name, s]));
      const roots = list.filter((s) => !s.parent || !byName[s.parent]);
      return [h("h2", {}, "Snapshot tree"),
        list.length ? h("ul", {class: "tree", "aria-label": "Snapshot tree"},
          roots.map((s) => snapshotItem(s, byName))) : h("p", {class: "muted"}, "no snapshots")];
    });
  }

  function renderClones(v, all) {
    const kids = all.filter((x) => x.clone_of?.volume === name);
    renderIf(clones, [v.clone, kids.map((k) => [k.name, k.clone_of, k.health])], () => [
      h("h2", {}, "Clones"),
      v.clone ? h("p", {}, "A linked clone of ", volumeLink(v.clone.parent?.volume ?? "?"),
        ` at snapshot ${v.clone.parent?.snapshot ?? "?"}: ${bytes(v.clone.shared_bytes)} ` +
        `shared, ${bytes(v.clone.owned_bytes)} its own.`) : null,
      table(`Linked clones of ${name}`, ["Volume", "Snapshot", "Health"],
        kids.map((k) => [volumeLink(k.name), k.clone_of.snapshot, badge(k.health)]),
        "no clones"),
    ]);
  }

  function renderBackups(list, error) {
    renderIf(backups, [list, error], () => [
      h("h2", {}, "Backups"),
      error ? h("p", {class: "muted"}, error)
        : backupTable({api, activity}, `Backups of ${name}`, list),
    ]);
  }

  async function addJob() {
    const v = await formDialog({
      title: `Recurring job for ${name}`, submitLabel: "Add job",
      fields: [
        {name: "kind", label: "Kind", type: "select", value: "snapshot",
          options: [{value: "snapshot"}, {value: "backup"}, {value: "scrub"}]},
        {name: "cron", label: "Schedule (cron, UTC)", required: true, value: "0 3 * * *",
          help: "five fields: minute hour day month weekday"},
        {name: "retain", label: "Keep (newest)", type: "number", min: 1, max: 1000, value: 7},
        {name: "name", label: "Job name (optional)"},
      ],
    });
    if (!v) return;
    const body = {kind: v.kind, cron: v.cron, retain: Number(v.retain || 1), volumes: [name]};
    if (v.name) body.name = v.name;
    await act(`Add ${v.kind} job`, () => api.post("/v1/jobs", body));
  }

  async function deleteJob(job) {
    const ok = await confirmDialog({
      title: `Delete job ${job.name}?`, confirmLabel: `Delete job ${job.name}`,
      message: `No more ${job.kind}s on its schedule (those it made stay).`,
    });
    if (ok) await act(`Delete job ${job.name}`, () => api.del(`/v1/jobs/${q(job.name)}`));
  }

  function renderJobs(list, v) {
    const mine = list.filter((j) => (j.volumes ?? []).includes(name) ||
      (Object.keys(j.selector ?? {}).length &&
        Object.entries(j.selector).every(([k, x]) => v.labels?.[k] === x)));
    renderIf(jobs, mine, () => [h("h2", {}, "Recurring jobs"),
      canAct ? h("p", {}, button("Add recurring job", addJob)) : null,
      table(`Recurring jobs of ${name}`, ["Name", "Kind", "Schedule", "Keep", "Next run",
        "Last result", ...(canAct ? ["Actions"] : [])],
      mine.map((j) => [j.name, j.kind, h("span", {class: "mono"}, j.cron), String(j.retain),
        time(j.next_run), j.last_result ? `${j.last_result.ok ? "ok" : "failed"}: ` +
          `${j.last_result.message ?? ""}` : "–",
        ...(canAct ? [h("button", {type: "button", class: "small danger",
          "aria-label": `Delete job ${j.name}`, onclick: () => deleteJob(j)}, "Delete")] : [])]),
      "no jobs")]);
  }

  function renderTasks(list) {
    renderIf(tasks, list, () => list.length ? [h("h2", {}, "Running tasks"),
      h("ul", {class: "tasks"}, list.map((t) => h("li", {}, h("strong", {}, t.kind), " ",
        progress(t.progress?.done, t.progress?.total, `${t.kind} progress`),
        t.message ? h("span", {class: "muted"}, ` ${t.message}`) : null)))] : []);
  }

  function renderEvents(list) {
    renderIf(events, list.map((e) => e.id), () => [h("h2", {}, "Events"),
      table(`Events of ${name}, newest first`, ["Time", "Level", "Kind", "Message"],
        [...list].reverse().map((e) => [time(e.time), badge(e.level), e.kind, e.message]),
        "no events")]);
  }

  // ------------------------------------------------------------------ refresh

  let backupList = [];
  let backupError = null;
  let jobList = [];

  return {
    el,
    async refresh() {
      let v;
      try {
        v = await api.get(base);
      } catch (err) {
        if (err.status === 404) {
          title.textContent = `Volume ${name} does not exist`;
          toolbar.replaceChildren();
          return;
        }
        throw err;
      }
      current = v;
      const slow = refreshes++ % SLOW_EVERY === 0;
      const [snaps, all, running, evs] = await Promise.all([
        api.get(`${base}/snapshots`).catch(() => []),
        api.get("/v1/volumes").catch(() => []),
        api.get("/v1/tasks?state=running").catch(() => []),
        api.get(`/v1/events?volume=${q(name)}&limit=30`).catch(() => []),
      ]);
      if (slow) {
        try {
          backupList = await api.get(`/v1/backups?volume=${q(name)}`);
          backupError = null;
        } catch (err) {
          backupList = [];
          backupError = err.message;
        }
        jobList = await api.get("/v1/jobs").catch(() => []);
        // Each replica is asked for its space: not at every poll.
        space = (await api.get(`${base}?space=true`).catch(() => null))?.space ?? space;
      }
      snapshots = snaps;
      renderToolbar(v);
      renderDetails(v);
      renderReplicas(v);
      renderTree(snaps);
      renderClones(v, all);
      renderBackups(backupList, backupError);
      renderJobs(jobList, v);
      renderTasks(running.filter((t) => t.volume === name));
      renderEvents(evs);
    },
    draw() {
      charts.draw(history.of(name));
    },
    /** Fetch the slow parts again at the next refresh (after an action). */
    touch() {
      refreshes = 0;
    },
  };
}
