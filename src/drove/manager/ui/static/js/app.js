// The UI's shell: log in, route between pages by the URL's #fragment, and poll the
// manager (the page's data and the I/O metrics) every two seconds while logged in.

import {Activity} from "./activity.js";
import {Api} from "./api.js";
import {dashboardView} from "./dashboard.js";
import {fill, h} from "./dom.js";
import {loginView} from "./login.js";
import {History} from "./metrics.js";
import {backupsView, eventsView, settingsView} from "./pages.js";
import {usersView} from "./users.js";
import {volumeView} from "./volume.js";

const POLL_MS = 2000;

const api = new Api();
const history = new History();
const activity = new Activity(api);
const main = document.getElementById("main");
const who = document.getElementById("who");
const nav = document.getElementById("nav");
let view = null;
let timer = null;

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

const context = {api, activity, history, go};

async function scrapeMetrics() {
  try {
    history.add(await api.call("GET", "/metrics", undefined, {text: true}));
  } catch {
    // Charts wait for the next scrape; the page says when the manager is away.
  }
}

let busy = false;
let again = false;

/** Refresh the page and the charts now, then every POLL_MS; one refresh at a time. */
async function tick() {
  if (busy) {
    again = true; // asked for while one runs (an action ended): once more right after
    return;
  }
  busy = true;
  clearTimeout(timer);
  const current = view;
  try {
    if (current?.refresh) {
      await scrapeMetrics();
      await current.refresh();
      document.body.dataset.stale = "";
      if (current === view) current.draw?.();
    }
  } catch (err) {
    activity.say(`cannot reach the manager: ${err.message}`, "error");
    document.body.dataset.stale = "true";
  } finally {
    busy = false;
  }
  if (again) {
    again = false;
    tick();
  } else if (view?.refresh) {
    timer = setTimeout(tick, POLL_MS);
  }
}

const PAGES = [
  {hash: "#/", label: "Dashboard"},
  {hash: "#/backups", label: "Backups", make: backupsView},
  {hash: "#/events", label: "Events", make: eventsView},
  {hash: "#/settings", label: "Settings", make: settingsView, role: "admin"},
  {hash: "#/users", label: "Users", make: usersView, role: "admin"},
];

function header() {
  if (!api.loggedIn) {
    fill(who);
    fill(nav);
    return;
  }
  const here = location.hash || "#/";
  fill(nav, PAGES.filter((p) => !p.role || api.can(p.role)).map((p) =>
    h("a", {href: p.hash, "aria-current": p.hash === here ? "page" : null}, p.label)));
  const logout = h("button", {type: "button", onclick: async () => {
    await api.logout();
    go("#/login");
  }}, "Log out");
  fill(who, h("span", {}, "Logged in as ", h("strong", {}, api.user), " (",
    h("span", {"data-role": api.role}, api.role), ") "), logout);
}

function show(next, title) {
  view = next;
  document.title = `${title} · drove`;
  fill(main, next.el, activity.el);
  header();
  // A new page: focus its heading, so keyboard and screen reader users start there.
  const heading = main.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    heading.focus();
  }
  tick();
}

function route() {
  clearTimeout(timer);
  const hash = location.hash || "#/";
  if (!api.loggedIn) {
    const login = loginView(api, () => go(hash === "#/login" ? "#/" : hash));
    view = null;
    document.title = "Log in · drove";
    fill(main, login.el);
    header();
    login.focus();
    return;
  }
  const volume = /^#\/volumes\/(.+)$/.exec(hash);
  if (volume) {
    const name = decodeURIComponent(volume[1]);
    const page = volumeView(context, name);
    activity.onChange = () => {
      page.touch();
      tick();
    };
    show(page, name);
    return;
  }
  const page = PAGES.find((p) => p.hash === hash && p.make && (!p.role || api.can(p.role)));
  if (page) {
    activity.onChange = () => tick();
    show(page.make(context), page.label);
    return;
  }
  const dash = dashboardView(context);
  activity.onChange = () => tick();
  show(dash, "Dashboard");
}

api.onUnauthorized = () => route();
window.addEventListener("hashchange", route);
window.addEventListener("resize", () => view?.draw?.());

(async () => {
  await api.resume();
  route();
})();

// The skip link moves focus without touching the #fragment the router reads.
document.querySelector(".skip")?.addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});
