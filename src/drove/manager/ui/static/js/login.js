// The login page: the API token, or a user's name and password.

import {h} from "./dom.js";

/** The login view; calls onLogin() once the api holds a session. */
export function loginView(api, onLogin) {
  const error = h("p", {class: "error", role: "alert"});
  const tokenInput = h("input", {id: "login-token", name: "token", type: "password",
    autocomplete: "current-password", "aria-describedby": "login-token-help"});
  const userInput = h("input", {id: "login-user", name: "user", autocomplete: "username"});
  const passwordInput = h("input", {id: "login-password", name: "password", type: "password",
    autocomplete: "current-password"});

  const submit = async (event, fields) => {
    event.preventDefault();
    error.textContent = "";
    const button = event.target.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      await api.login(fields());
      onLogin();
    } catch (err) {
      error.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  };

  const tokenForm = h("form", {class: "login-form", "aria-labelledby": "login-token-title",
    onsubmit: (e) => submit(e, () => ({token: tokenInput.value.trim()}))},
  h("h2", {id: "login-token-title"}, "With a token"),
  h("div", {class: "field"}, h("label", {for: "login-token"}, "API token"), tokenInput,
    h("small", {id: "login-token-help"}, "The token drove serve made: DATA_DIR/token, " +
      "or one `drove user create` printed.")),
  h("button", {type: "submit", class: "primary"}, "Log in with token"));

  const userForm = h("form", {class: "login-form", "aria-labelledby": "login-user-title",
    onsubmit: (e) => submit(e, () => ({user: userInput.value.trim(),
      password: passwordInput.value}))},
  h("h2", {id: "login-user-title"}, "With a user name and password"),
  h("div", {class: "field"}, h("label", {for: "login-user"}, "User"), userInput),
  h("div", {class: "field"}, h("label", {for: "login-password"}, "Password"), passwordInput),
  h("button", {type: "submit", class: "primary"}, "Log in"));

  const el = h("section", {class: "login", "aria-labelledby": "login-title"},
    h("h1", {id: "login-title"}, "Log in to drove"), error,
    h("div", {class: "login-forms"}, tokenForm, userForm));
  return {el, focus: () => tokenInput.focus()};
}
