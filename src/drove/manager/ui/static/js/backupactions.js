// What can be done to a backup (restore, verify, delete) and how a backup list reads:
// shared by the volume page and the backups page.

import {confirmDialog, formDialog} from "./dialogs.js";
import {bytes, h, time} from "./dom.js";
import {table} from "./volumes.js";

const q = encodeURIComponent;

/** Ask for the new volume and restore a backup into it (a task). */
export async function restoreBackup({api, activity}, b) {
  const v = await formDialog({
    title: `Restore ${b.name}`, submitLabel: "Restore",
    note: `Into a new volume (${bytes(b.size)}, ${b.volume} at snapshot ${b.snapshot}).`,
    fields: [
      {name: "volume", label: "New volume name", required: true},
      {name: "instant", label: "Instant: usable at once, filled in the background",
        type: "checkbox"},
    ],
  });
  if (!v) return null;
  return activity.run(`Restore ${b.name} to ${v.volume}`,
    () => api.post(`/v1/backups/${q(b.name)}/restore`, {volume: v.volume, instant: v.instant}));
}

/** Re-read and check every block of a backup (a task). */
export function verifyBackup({api, activity}, b) {
  return activity.run(`Verify ${b.name}`, () => api.post(`/v1/backups/${q(b.name)}/verify`));
}

/** Delete a backup, once confirmed (a task). */
export async function deleteBackup({api, activity}, b) {
  const ok = await confirmDialog({
    title: `Delete backup ${b.name}?`, confirmLabel: "Delete backup",
    message: `The backup of ${b.volume} and the blocks no other backup uses are deleted ` +
      "from the target.",
  });
  if (!ok) return null;
  return activity.run(`Delete ${b.name}`, () => api.del(`/v1/backups/${q(b.name)}`));
}

/** A table of backups, with their actions when the role allows them. */
export function backupTable(ctx, caption, list, {withVolume = false} = {}) {
  const canAct = ctx.api.can("operator");
  const small = (label, aria, fn, cls = "small") =>
    h("button", {type: "button", class: cls, "aria-label": aria, onclick: fn}, label);
  return table(caption,
    ["Name", ...(withVolume ? ["Volume"] : []), "Snapshot", "Created", "Data", "New",
      ...(canAct ? ["Actions"] : [])],
    list.map((b) => [h("span", {class: "mono"}, b.name), ...(withVolume ? [b.volume] : []),
      b.snapshot, time(b.created), bytes(b.data_size), bytes(b.bytes_new),
      ...(canAct ? [h("span", {class: "row-actions"},
        small("Restore", `Restore ${b.name}`, () => restoreBackup(ctx, b)),
        small("Verify", `Verify ${b.name}`, () => verifyBackup(ctx, b)),
        small("Delete", `Delete ${b.name}`, () => deleteBackup(ctx, b), "small danger"))]
        : [])]),
    "no backups");
}
