// The smaller pages: events with filters, every backup and the target, settings.

import {backupTable} from "./backupactions.js";
import {formDialog} from "./dialogs.js";
import {badge, h, renderIf, time} from "./dom.js";
import {table, volumeLink} from "./volumes.js";

/** A labelled input or select in a filter bar. */
function filter(id, label, input) {
  input.id = id;
  return h("span", {class: "filter"}, h("label", {for: id}, label), input);
}

/** Events, newest first, filtered by volume, level and kind. */
export function eventsView({api}) {
  const volume = h("input", {name: "volume", placeholder: "any", autocomplete: "off"});
  const level = h("select", {name: "level"},
    ["", "info", "warning", "error"].map((x) => h("option", {value: x}, x || "any")));
  const kind = h("input", {name: "kind", placeholder: "any, or part of one",
    autocomplete: "off"});
  const list = h("section", {"aria-live": "off"});
  const el = h("div", {},
    h("h1", {}, "Events"),
    h("form", {class: "filters", role: "search", "aria-label": "Event filters",
      onsubmit: (e) => e.preventDefault()},
    filter("ev-volume", "Volume", volume), filter("ev-level", "Level", level),
    filter("ev-kind", "Kind", kind)),
    list);
  let last = [];
  const render = () => {
    const shown = last.filter((e) => (!level.value || e.level === level.value) &&
      (!kind.value || e.kind.includes(kind.value.trim())));
    renderIf(list, shown.map((e) => e.id), () => table("Events, newest first",
      ["Time", "Level", "Kind", "Volume", "Message"],
      [...shown].reverse().map((e) => [time(e.time), badge(e.level), e.kind,
        e.volume ? volumeLink(e.volume) : "–", e.message]), "no events"));
  };
  level.addEventListener("change", render);
  kind.addEventListener("input", render);
  return {
    el,
    async refresh() {
      const v = volume.value.trim();
      last = await api.get(`/v1/events?limit=500${v ? `&volume=${encodeURIComponent(v)}` : ""}`);
      render();
    },
  };
}

/** The backup target and every backup on it. */
export function backupsView(ctx) {
  const {api, activity} = ctx;
  const target = h("section", {"aria-label": "Backup target"});
  const list = h("section", {"aria-label": "Backups"});
  const el = h("div", {}, h("h1", {}, "Backups"), target, list);

  async function setTarget(current) {
    const v = await formDialog({
      title: "Backup target", submitLabel: "Set target",
      note: "Replaces the whole setting; the target is opened first and refused if unusable.",
      fields: [
        {name: "url", label: "URL", value: current.url,
          help: "file:///abs/dir or s3://bucket/prefix; empty to unset"},
        {name: "endpoint", label: "S3 endpoint (optional)", value: current.endpoint},
        {name: "region", label: "S3 region (optional)", value: current.region},
        {name: "access_key", label: "S3 access key (optional)", value: current.access_key},
        {name: "secret_key", label: "S3 secret key (optional)", type: "password",
          help: current.secret_key_set ? "one is set; empty keeps none" : null},
      ],
    });
    if (!v) return;
    await activity.run("Set the backup target",
      () => api.call("PUT", "/v1/backup-target", {...v, url: v.url ?? ""}));
  }

  return {
    el,
    async refresh() {
      const t = await api.get("/v1/backup-target");
      renderIf(target, t, () => [
        h("h2", {}, "Target"),
        h("p", {}, t.url ? h("span", {class: "mono"}, t.url) : "none set", " ",
          t.url ? badge(t.available ? "ready" : "unavailable") : null,
          t.error ? h("span", {class: "error"}, ` ${t.error}`) : null),
        api.can("admin") ? h("button", {type: "button", onclick: () => setTarget(t)},
          "Change target") : null,
      ]);
      let backups = [];
      let error = null;
      if (t.url) {
        try {
          backups = await api.get("/v1/backups");
        } catch (err) {
          error = err.message;
        }
      }
      renderIf(list, [backups, error], () => [h("h2", {}, "Backups"),
        error ? h("p", {class: "error"}, error)
          : backupTable(ctx, "Every backup on the target, newest first", backups,
            {withVolume: true})]);
    },
  };
}

/** Every setting; an admin changes them. */
export function settingsView({api, activity}) {
  const body = h("section", {"aria-label": "Settings"});
  const el = h("div", {}, h("h1", {}, "Settings"), body);

  async function change(settings) {
    const v = await formDialog({
      title: "Change settings", submitLabel: "Save",
      fields: Object.entries(settings).map(([k, x]) => ({name: k, label: k,
        value: x ?? "", step: "any",
        type: {number: "number", boolean: "checkbox"}[typeof x] ?? "text"})),
    });
    if (!v) return;
    const changes = {};
    for (const [k, x] of Object.entries(v)) {
      const before = settings[k];
      // As the setting's own type: the form gives text (checkboxes booleans).
      const value = typeof before === "number" && x !== null ? Number(x) : x;
      if (value !== before && value !== null) changes[k] = value;
    }
    if (Object.keys(changes).length) {
      await activity.run("Change settings", () => api.patch("/v1/settings", changes));
    }
  }

  return {
    el,
    async refresh() {
      const s = await api.get("/v1/settings");
      renderIf(body, s, () => [
        h("dl", {class: "details"}, Object.entries(s).map(([k, x]) =>
          [h("dt", {class: "mono"}, k), h("dd", {}, x === null ? "–" : String(x))])),
        api.can("admin") ? h("p", {}, h("button", {type: "button",
          onclick: () => change(s)}, "Change settings")) : null,
      ]);
    },
  };
}
