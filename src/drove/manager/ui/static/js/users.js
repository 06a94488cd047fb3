// The users (admin only): each with its role, password, tokens and sessions; create one
// (its token shown once), change its role, give it a token, end its tokens and sessions,
// delete it.

import {confirmDialog, formDialog} from "./dialogs.js";
import {fill, h, renderIf, time} from "./dom.js";
import {table} from "./volumes.js";

const q = encodeURIComponent;
const ROLES = [{value: "viewer"}, {value: "operator"}, {value: "admin"}];

/** The users page. */
export function usersView({api, activity}) {
  const list = h("section", {"aria-label": "Users"});
  const once = h("section", {"aria-label": "New token"});
  const el = h("div", {}, h("h1", {}, "Users"),
    h("p", {}, h("button", {type: "button", onclick: () => create()}, "Create user")),
    once, list);

  /** A new token, shown here this once only (the manager keeps its hash). */
  function showToken(name, token) {
    const field = h("input", {id: "new-token", class: "mono", readonly: true, value: token,
      autocomplete: "off", spellcheck: "false"});
    fill(once, h("div", {class: "token-once"},
      h("label", {for: "new-token"}, `Token of ${name}`), field,
      h("small", {}, "Shown this once only: the manager keeps its hash, not the token."),
      h("p", {}, h("button", {type: "button", onclick: () => fill(once)}, "Hide the token"))));
    field.focus();
    field.select();
  }

  async function create() {
    const v = await formDialog({
      title: "Create a user", submitLabel: "Create user",
      note: "Its API token is shown once, after.",
      fields: [
        {name: "name", label: "User name", required: true},
        {name: "role", label: "Role", type: "select", value: "viewer", options: ROLES},
        {name: "password", label: "Password (optional, for the web UI)", type: "password",
          help: "at least 8 characters"},
      ],
    });
    if (!v) return;
    const body = {name: v.name, role: v.role};
    if (v.password) body.password = v.password;
    const made = await activity.run(`Create user ${v.name}`, () => api.post("/v1/users", body));
    if (made?.token) showToken(made.name, made.token);
  }

  async function changeRole(u) {
    const v = await formDialog({
      title: `Role of ${u.name}`, submitLabel: "Change role",
      note: "Takes effect at the user's next call.",
      fields: [{name: "role", label: "Role", type: "select", value: u.role, options: ROLES}],
    });
    if (v && v.role !== u.role) {
      await activity.run(`Role of ${u.name}`,
        () => api.patch(`/v1/users/${q(u.name)}`, {role: v.role}));
    }
  }

  async function newToken(u) {
    const made = await activity.run(`New token for ${u.name}`,
      () => api.post(`/v1/users/${q(u.name)}/tokens`, {revoke_others: false}));
    if (made?.token) showToken(u.name, made.token);
  }

  async function revoke(u) {
    const ok = await confirmDialog({
      title: `Revoke every token of ${u.name}?`, confirmLabel: `Revoke tokens of ${u.name}`,
      message: `Every token and login session of ${u.name} ends; its password stays.`,
    });
    if (ok) await activity.run(`Revoke tokens of ${u.name}`,
      () => api.del(`/v1/users/${q(u.name)}/tokens`));
  }

  async function remove(u) {
    const ok = await confirmDialog({
      title: `Delete user ${u.name}?`, confirmLabel: `Delete user ${u.name}`,
      message: `${u.name} and its tokens and sessions are deleted.`,
    });
    if (ok) await activity.run(`Delete user ${u.name}`, () => api.del(`/v1/users/${q(u.name)}`));
  }

  const small = (label, aria, fn, cls = "small") =>
    h("button", {type: "button", class: cls, "aria-label": aria, onclick: fn}, label);

  return {
    el,
    async refresh() {
      const users = await api.get("/v1/users");
      renderIf(list, users, () => table("Users", ["Name", "Role", "Password", "Tokens",
        "Sessions", "Last used", "Actions"],
      users.map((u) => [h("span", {class: "mono"}, u.name), u.role, u.password ? "set" : "–",
        String(u.tokens.length), String(u.sessions), time(u.last_used),
        h("span", {class: "row-actions"},
          small("Role", `Change role of ${u.name}`, () => changeRole(u)),
          small("New token", `New token for ${u.name}`, () => newToken(u)),
          small("Revoke", `Revoke tokens of ${u.name}`, () => revoke(u), "small danger"),
          small("Delete", `Delete user ${u.name}`, () => remove(u), "small danger"))]),
      "no users"));
    },
  };
}
