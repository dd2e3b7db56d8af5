/* fedpilot dashboard: API access, the token field, polling and formatting.
 *
 * Every page loads this first. It never writes API data as HTML: text goes
 * through textContent, so names and messages from the API cannot inject markup.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "fedpilot.apiToken";
  const POLL_MS = 2000;
  const HIDDEN_POLL_MS = 10000;
  const TERMINAL = new Set(["done", "failed", "cancelled"]);

  const FP = (window.fedpilot = window.fedpilot || {});
  FP.POLL_MS = POLL_MS;
  FP.TERMINAL = TERMINAL;

  // ---- API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail || "HTTP " + status);
      this.status = status;
      this.detail = detail;
    }
  }
  FP.ApiError = ApiError;

  function getToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (e) {
      return "";
    }
  }

  function setToken(value) {
    try {
      if (value) window.sessionStorage.setItem(TOKEN_KEY, value);
      else window.sessionStorage.removeItem(TOKEN_KEY);
    } catch (e) {
      /* storage disabled: the token lasts until the page is reloaded */
    }
    memoryToken = value;
  }
  let memoryToken = getToken();
  FP.token = function () {
    return getToken() || memoryToken || "";
  };

  FP.headers = function () {
    const h = { Accept: "application/json" };
    const token = FP.token();
    if (token) h.Authorization = "Bearer " + token;
    return h;
  };

  FP.api = async function (path) {
    const response = await fetch(path, {
      headers: FP.headers(),
      cache: "no-store",
      credentials: "omit",
    });
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        if (body && typeof body.detail === "string") detail = body.detail;
      } catch (e) {
        /* not JSON */
      }
      throw new ApiError(response.status, detail);
    }
    return response.json();
  };

  // ---- DOM helpers --------------------------------------------------------------

  /** el("td", {class: "num", dataset: {round: 3}, text: "x"}, child, ...) */
  FP.el = function (tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key === "dataset") {
        for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
      } else if (key === "on") {
        for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
      } else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  };

  FP.$ = (id) => document.getElementById(id);

  FP.setText = function (id, text) {
    const node = FP.$(id);
    if (node && node.textContent !== text) node.textContent = text;
    return node;
  };

  /** Replace the children of `node`, skipping the work when `key` did not change. */
  FP.replace = function (node, key, build) {
    if (key !== undefined && node.dataset.renderKey === key) return false;
    node.replaceChildren(...build());
    if (key !== undefined) node.dataset.renderKey = key;
    return true;
  };

  FP.badge = function (state, label) {
    return FP.el("span", {
      class: "badge",
      dataset: { state: state || "unknown" },
      text: label || state || "unknown",
    });
  };

  FP.setBadge = function (node, state) {
    node.dataset.state = state || "unknown";
    node.textContent = state || "unknown";
  };

  // ---- formatting -----------------------------------------------------------------

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  FP.bytes = function (n) {
    if (n === null || n === undefined) return "–";
    let value = Number(n);
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = unit === 0 || value >= 100 ? 0 : 1;
    return value.toFixed(digits) + " " + UNITS[unit];
  };

  FP.pct = function (x) {
    return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%";
  };

  FP.num = function (x, digits) {
    return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 3 : digits);
  };

  FP.seconds = function (s) {
    if (s === null || s === undefined) return "–";
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60);
    return m + " min " + Math.round(s - 60 * m) + " s";
  };

  function parseDate(iso) {
    if (!iso) return null;
    // The API sends timezone-aware ISO 8601; treat a bare one as UTC, never local.
    const text = /[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : iso + "Z";
    const d = new Date(text);
    return isNaN(d.getTime()) ? null : d;
  }
  FP.parseDate = parseDate;

  FP.time = function (iso) {
    const d = parseDate(iso);
    if (!d) return "–";
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    const clock = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    return sameDay ? clock : d.toLocaleDateString() + " " + clock;
  };

  FP.ago = function (iso) {
    const d = parseDate(iso);
    if (!d) return "–";
    const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    if (s < 86400) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  };

  FP.timeCell = function (iso, cls) {
    const d = parseDate(iso);
    return FP.el("td", { class: cls }, d ? FP.el("time", { datetime: d.toISOString(), title: d.toString(), text: FP.time(iso) }) : "–");
  };

  // ---- the token field and banners ------------------------------------------------

  let authShown = false;

  function showAuth(error) {
    const banner = FP.$("auth-banner");
    const hadToken = Boolean(FP.token());
    banner.dataset.reason = hadToken ? "refused" : "missing";
    banner.textContent = hadToken
      ? "The coordinator refused this API token (HTTP 401 Unauthorized). Check it and enter it again in the “API token” field above."
      : "This coordinator requires an API token (HTTP 401 Unauthorized). Enter it in the “API token” field above; it is kept in this browser tab only.";
    banner.hidden = false;
    document.body.dataset.auth = "required";
    if (!authShown) {
      authShown = true;
      const input = FP.$("token-input");
      if (input && document.activeElement !== input) input.focus();
    }
  }

  function hideAuth() {
    authShown = false;
    const banner = FP.$("auth-banner");
    if (banner && !banner.hidden) banner.hidden = true;
    document.body.dataset.auth = "ok";
  }

  function showConnection(message) {
    const banner = FP.$("conn-banner");
    banner.textContent = message;
    banner.hidden = false;
  }

  function hideConnection() {
    const banner = FP.$("conn-banner");
    if (banner && !banner.hidden) banner.hidden = true;
  }

  function updateTokenStatus() {
    const has = Boolean(FP.token());
    FP.$("token-clear").hidden = !has;
    FP.setText("token-status", has ? "token set for this tab" : "");
    FP.$("token-input").placeholder = has ? "•••••• (set)" : "not needed on loopback";
  }

  function setupTokenForm() {
    const form = FP.$("token-form");
    if (!form) return;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const input = FP.$("token-input");
      const value = input.value.trim();
      if (!value) return;
      setToken(value);
      input.value = "";
      updateTokenStatus();
      FP.refresh();
    });
    FP.$("token-clear").addEventListener("click", () => {
      setToken("");
      updateTokenStatus();
      FP.refresh();
    });
    updateTokenStatus();
  }

  // ---- polling ----------------------------------------------------------------------

  let tick = null;
  let timer = null;
  let running = false;
  let again = false;
  let polls = 0;

  async function run() {
    if (!tick) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    window.clearTimeout(timer);
    let delay = POLL_MS;
    try {
      const wanted = await tick();
      if (typeof wanted === "number") delay = wanted;
      hideAuth();
      hideConnection();
      polls += 1;
      const stamp = FP.$("last-updated");
      if (stamp) {
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
        stamp.dataset.polls = String(polls);
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        showAuth(error);
      } else if (error instanceof ApiError) {
        showConnection("The coordinator answered HTTP " + error.status + ": " + error.detail + ". Retrying.");
      } else {
        showConnection("Cannot reach the coordinator (" + (error && error.message ? error.message : error) + "). Retrying every " + POLL_MS / 1000 + " s.");
        if (window.console) console.error(error);
      }
    } finally {
      running = false;
      if (again) {
        again = false;
        window.setTimeout(run, 0);
      } else {
        timer = window.setTimeout(run, document.hidden ? Math.max(delay, HIDDEN_POLL_MS) : delay);
      }
    }
  }

  /** Call `fn` now and then every ~2 s; it may return the next delay in ms. */
  FP.poll = function (fn) {
    tick = fn;
    run();
  };

  /** Poll again now (after a token change, a click). */
  FP.refresh = function () {
    run();
  };

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) run();
  });

  // ---- shared: the workers table ---------------------------------------------------

  function deviceText(device) {
    if (!device) return "–";
    const name = device.name || device.kind || "";
    const total = Number(device.total_memory_bytes || 0);
    return (name || "–") + (total > 0 ? " · " + FP.bytes(total) : "");
  }

  // Why a task did not complete, as the worker (or the coordinator) put it:
  // reason code, where (round and task kind), then the message.
  FP.problem = function (p) {
    return [
      FP.el("code", { class: "reason-code", text: p.reason }),
      " ",
      FP.el("span", { class: "muted", text: "round " + p.round + " " + p.kind + ": " }),
      FP.el("span", { class: "problem-message", text: p.message }),
    ];
  };

  FP.renderWorkers = function (tbody, workers) {
    const key = JSON.stringify(workers.map((w) => [w.id, w.name, w.alive, w.state, w.budget_bytes, w.device, w.problem, Math.floor(Date.parse(w.last_heartbeat) / 5000)]));
    FP.replace(tbody, key, () => {
      if (!workers.length) {
        return [FP.el("tr", { class: "placeholder" }, FP.el("td", { colspan: 7, text: "No worker has registered." }))];
      }
      return workers.map((w) =>
        FP.el(
          "tr",
          { dataset: { workerId: w.id, worker: w.name, alive: w.alive } },
          FP.el("th", { scope: "row" }, w.name, FP.el("div", { class: "sub mono", text: w.id.slice(0, 8) })),
          FP.el("td", {}, FP.badge(w.alive ? "alive" : "lost", w.alive ? "connected" : "lost")),
          FP.el("td", {}, FP.badge(w.state)),
          FP.el("td", { class: "num", text: FP.bytes(w.budget_bytes) }),
          FP.el("td", { text: deviceText(w.device) }),
          FP.el("td", {}, FP.el("time", { datetime: w.last_heartbeat, title: FP.time(w.last_heartbeat), text: FP.ago(w.last_heartbeat) })),
          w.problem
            ? FP.el("td", { class: "worker-problem", dataset: { reason: w.problem.reason } }, ...FP.problem(w.problem))
            : FP.el("td", { class: "muted", text: "–" }),
        ),
      );
    });
  };

  document.addEventListener("DOMContentLoaded", setupTokenForm);
})();
