// The manager's API as the UI calls it: a session cookie (POST /v1/session) where the
// manager has sessions, else the Bearer token kept in this tab's sessionStorage.

const TOKEN_KEY = "drove.token";

/** An API answer other than 2xx: status and the manager's detail message. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    return JSON.stringify(body.detail ?? body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

/** Who is logged in and how the UI authenticates its calls. */
export class Api {
  constructor() {
    this.user = null;
    this.role = null;
    this.csrf = null;
    this.token = sessionStorage.getItem(TOKEN_KEY);
    this.onUnauthorized = () => {};
  }

  /** True while a user is logged in. */
  get loggedIn() {
    return this.role !== null;
  }

  /** Whether the role may do what needs ``needed`` (viewer < operator < admin). */
  can(needed) {
    const rank = {viewer: 0, operator: 1, admin: 2};
    return (rank[this.role] ?? -1) >= rank[needed];
  }

  /** One call: the JSON answer, or ApiError. */
  async call(method, path, body, {text = false} = {}) {
    const headers = {Accept: text ? "text/plain" : "application/json"};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (this.csrf && method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = this.csrf;
    const response = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && this.loggedIn) {
      this.forget();
      this.onUnauthorized();
    }
    if (!response.ok) throw new ApiError(response.status, await detailOf(response));
    if (text) return response.text();
    return response.status === 204 ? null : response.json();
  }

  get(path) { return this.call("GET", path); }
  post(path, body = {}) { return this.call("POST", path, body); }
  patch(path, body) { return this.call("PATCH", path, body); }
  del(path) { return this.call("DELETE", path); }

  /** Find an existing session (the cookie, or this tab's token); true when logged in. */
  async resume() {
    try {
      const s = await this.call("GET", "/v1/session");
      this.accept(s);
      return true;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 404 || !this.token) return false;
    }
    // A manager without sessions: the token alone.
    return this.checkToken(this.token);
  }

  /** Log in with a token, or a user and password; throws ApiError with the reason. */
  async login({token, user, password}) {
    this.forget();
    const body = token ? {token} : {user, password};
    try {
      this.accept(await this.call("POST", "/v1/session", body));
      return;
    } catch (err) {
      if (!(err instanceof ApiError) || (err.status !== 404 && err.status !== 405)) throw err;
    }
    if (!token) {
      throw new ApiError(404, "this manager has no users yet: log in with the API token " +
                              "(DATA_DIR/token)");
    }
    if (!(await this.checkToken(token))) {
      throw new ApiError(401, "wrong token: give the API token from DATA_DIR/token");
    }
  }

  async checkToken(token) {
    this.token = token;
    try {
      await this.call("GET", "/v1/volumes");
    } catch {
      this.forget();
      return false;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    // The one token there is: the first admin's.
    this.accept({user: "admin (token)", role: "admin", csrf: null});
    return true;
  }

  accept(session) {
    this.user = session.user;
    this.role = session.role;
    this.csrf = session.csrf ?? null;
  }

  /** End the session (server side too, where there is one). */
  async logout() {
    if (this.csrf) {
      try {
        await this.call("DELETE", "/v1/session");
      } catch {
        // Logged out here whatever the server says.
      }
    }
    this.forget();
  }

  forget() {
    this.user = null;
    this.role = null;
    this.csrf = null;
    this.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
  }
}
