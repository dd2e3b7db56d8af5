/* fedpilot dashboard: one job, live.
 *
 * Every ~2 s: GET /api/v1/jobs/{id} (state, history, modules), then the round on
 * screen (/rounds/{n}: assignments, memory, stragglers, rejections) and
 * /api/v1/workers. The round on screen is the newest one unless the operator
 * picked another in the round strip.
 */
(function () {
  "use strict";

  const FP = window.fedpilot;
  const el = FP.el;
  const $ = FP.$;

  const COLORS = {
    accuracy: "#2563eb",
    evalLoss: "#7c3aed",
    before: "#d97706",
    after: "#059669",
  };

  let page;
  let jobId;
  let selected = null; // a round number, or null to follow the newest round
  let latestJob = null;

  // ---- header, progress, round strip -----------------------------------------------

  function renderHeader(job) {
    page.dataset.state = job.state;
    page.dataset.round = String(job.current_round);
    page.dataset.rounds = String(job.rounds);
    FP.setText("job-name", job.name);
    document.title = job.name + " · " + job.state + " · fedpilot";
    FP.setBadge($("job-state"), job.state);

    const error = $("job-error");
    error.hidden = !job.error;
    if (job.error) error.textContent = "Failed: " + job.error;
    renderJobProblems(job.problems || []);

    FP.setText("fact-strategy", job.strategy || "–");
    const model = job.spec && typeof job.spec.model === "string" ? job.spec.model : "";
    FP.setText("fact-model", model ? model.split("/").filter(Boolean).pop() : "bundled MiniLM");
    $("fact-model").title = model || "bundled all-MiniLM-L6-v2";
    FP.setText("fact-workers", job.spec && job.spec.min_workers !== undefined ? String(job.spec.min_workers) : "–");
    FP.setText("fact-accuracy", FP.pct(job.eval_accuracy));
    FP.setText("fact-created", FP.time(job.created_at));
    FP.setText("fact-updated", FP.time(job.updated_at));

    const moved = job.history.reduce((n, r) => n + (r.bytes_in || 0) + (r.bytes_out || 0), 0);
    const bytes = $("bytes-total");
    bytes.dataset.bytes = String(moved);
    FP.setText("bytes-total", moved ? FP.bytes(moved) : "–");

    const hasAdapter = job.adapter_version !== null && job.adapter_version !== undefined;
    FP.setText("fact-adapter", hasAdapter ? "version " + job.adapter_version : "none yet");
    if (hasAdapter && job.adapter_sha256) $("fact-adapter").title = "sha256 " + job.adapter_sha256;
    $("adapter-download").hidden = !hasAdapter;

    const closed = job.history.filter((r) => r.state === "closed").length;
    const progress = $("round-progress");
    progress.max = Math.max(1, job.rounds);
    progress.value = Math.min(closed, job.rounds);
    progress.textContent = closed + " of " + job.rounds;
    const current = job.history.length ? job.history[job.history.length - 1] : null;
    let label = "Round " + job.current_round + " of " + job.rounds;
    if (current && current.number === job.current_round && current.state !== "closed") label += " · " + current.state;
    else if (!FP.TERMINAL.has(job.state)) label += " · " + job.state;
    label += " · " + closed + " closed";
    FP.setText("round-label", label);
  }

  function renderStrip(job) {
    const strip = $("round-strip");
    const byNumber = new Map(job.history.map((r) => [r.number, r]));
    const shown = shownRound(job);
    const key = JSON.stringify([job.rounds, job.history.map((r) => [r.number, r.state]), shown, selected]);
    FP.replace(strip, key, () => {
      const items = [];
      for (let n = 1; n <= Math.max(job.rounds, job.history.length); n += 1) {
        const r = byNumber.get(n);
        const state = r ? r.state : "pending";
        const button = el("button", {
          type: "button",
          class: "round-cell",
          dataset: { round: n, state },
          "aria-pressed": String(n === shown),
          "aria-label": "Round " + n + ": " + state,
          title: "Round " + n + ": " + state + (r && r.eval_accuracy !== null ? " · accuracy " + FP.pct(r.eval_accuracy) : ""),
          disabled: !r,
          text: String(n),
          on: {
            click: () => {
              const newest = latestJob && latestJob.history.length ? latestJob.history[latestJob.history.length - 1].number : 0;
              selected = n === newest ? null : n;
              FP.refresh();
            },
          },
        });
        items.push(el("li", {}, button));
      }
      return items;
    });
    const follow = $("follow-latest");
    follow.setAttribute("aria-pressed", String(selected === null));
    follow.textContent = selected === null ? "Following latest round" : "Follow latest round";
  }

  function shownRound(job) {
    const newest = job.history.length ? job.history[job.history.length - 1].number : 0;
    if (selected !== null && job.history.some((r) => r.number === selected)) return selected;
    selected = null;
    return newest;
  }

  // ---- curves and the rounds table --------------------------------------------------

  function renderCurves(job) {
    const pts = (field) => job.history.map((r) => ({ x: r.number, y: r[field] }));
    const accuracy = [{ key: "eval_accuracy", label: "held-out accuracy", color: COLORS.accuracy, points: pts("eval_accuracy") }];
    const pct = (v) => (100 * v).toFixed(v < 0.1 && v > 0 ? 1 : 0) + "%";
    FP.lineChart($("chart-accuracy"), {
      xMax: job.rounds,
      yMin: 0,
      yMax: 1,
      yFormat: (v) => FP.pct(v),
      tickFormat: pct,
      empty: job.spec && job.spec.eval_dataset ? "No evaluated round yet" : "This job has no evaluation set",
      series: accuracy,
    });
    FP.legend($("acc-desc"), accuracy, (v) => FP.pct(v));

    const loss = [
      { key: "eval_loss", label: "held-out loss", color: COLORS.evalLoss, points: pts("eval_loss") },
      { key: "train_loss_before", label: "train loss before", color: COLORS.before, dash: "5 4", points: pts("train_loss_before") },
      { key: "train_loss_after", label: "train loss after", color: COLORS.after, points: pts("train_loss_after") },
    ];
    FP.lineChart($("chart-loss"), {
      xMax: job.rounds,
      yFormat: (v) => v.toFixed(3),
      empty: "No closed round yet",
      series: loss,
    });
    FP.legend($("loss-desc"), loss, (v) => v.toFixed(3));
  }

  function renderRoundsTable(job) {
    const body = $("rounds-body");
    FP.replace(body, JSON.stringify(job.history), () => {
      if (!job.history.length) return [el("tr", { class: "placeholder" }, el("td", { colspan: 10, text: "No round yet." }))];
      return job.history.map((r) =>
        el(
          "tr",
          { dataset: { round: r.number, state: r.state } },
          el("th", { scope: "row", class: "num", text: String(r.number) }),
          el("td", {}, FP.badge(r.state)),
          el("td", { class: "num", text: String(r.participants) }),
          el("td", { class: "num" + (r.stragglers ? " warn-text" : ""), text: String(r.stragglers) }),
          el("td", { class: "num", text: FP.pct(r.eval_accuracy) }),
          el("td", { class: "num", text: FP.num(r.eval_loss) }),
          el("td", { class: "num", text: FP.num(r.train_loss_before) + " → " + FP.num(r.train_loss_after) }),
          el("td", { class: "num", text: FP.seconds(r.round_seconds) }),
          el("td", { class: "num", text: FP.bytes(r.bytes_in) }),
          el("td", { class: "num", text: FP.bytes(r.bytes_out) }),
        ),
      );
    });
  }

  // ---- the round on screen: heatmap, memory, problems --------------------------------

  function shortName(name) {
    const parts = name.split(".");
    return parts[parts.length - 1];
  }

  function layerLabel(layer) {
    if (layer < 0) return "";
    return layer === 0 ? "head" : "layer " + layer;
  }

  function columns(job, trains) {
    if (job.modules && job.modules.length) return job.modules;
    // No profile yet as far as the API knows: the assigned modules, layer read from the name
    // ("...layer.3..." is layer 4; a module outside the layers is the head, shown last).
    const seen = new Map();
    for (const a of trains) {
      for (const m of a.modules) {
        if (seen.has(m)) continue;
        const match = /(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\./.exec(m);
        seen.set(m, { name: m, layer: match ? Number(match[1]) + 1 : 0, update_count: 0 });
      }
    }
    const order = (c) => (c.layer === 0 ? Infinity : c.layer);
    return [...seen.values()].sort((x, y) => order(x) - order(y) || x.name.localeCompare(y.name));
  }

  function workerLabel(a) {
    return a.worker_name || a.worker_id.slice(0, 8);
  }

  function roundTitle(round, job) {
    if (!round) return "";
    const newest = job.history.length ? job.history[job.history.length - 1].number : 0;
    return "· round " + round.number + (round.number === newest ? " (latest)" : "") + " · " + round.state;
  }

  function renderHeatmap(job, round) {
    const table = $("heatmap");
    const empty = $("heatmap-empty");
    const trains = round ? round.assignments.filter((a) => a.kind === "train") : [];
    FP.setText("heatmap-round", roundTitle(round, job));
    if (!trains.length) {
      table.hidden = true;
      table.dataset.rows = "0";
      table.dataset.cells = "0";
      table.dataset.round = round ? String(round.number) : "";
      empty.hidden = false;
      empty.textContent = !round
        ? "No assignment yet: the job is waiting for enough workers."
        : round.state === "profiling"
          ? "Round " + round.number + " is profiling the workers' memory; the assignment follows."
          : "Round " + round.number + " has no training task.";
      return;
    }
    const cols = columns(job, trains);
    const key = JSON.stringify([round.number, cols.map((c) => [c.name, c.update_count]), trains.map((a) => [a.worker_id, a.worker_name, a.status, a.reason, a.modules])]);
    let filled = 0;
    for (const a of trains) filled += a.modules.filter((m) => cols.some((c) => c.name === m)).length;
    table.hidden = false;
    empty.hidden = true;
    table.dataset.rows = String(trains.length);
    table.dataset.cells = String(filled);
    table.dataset.round = String(round.number);
    table.dataset.columns = String(cols.length);
    FP.replace(table, key, () => {
      // Header: layer groups, then module names.
      const groups = [];
      for (const c of cols) {
        const label = layerLabel(c.layer);
        const last = groups[groups.length - 1];
        if (last && last.label === label) last.span += 1;
        else groups.push({ label, span: 1 });
      }
      const top = el("tr", {}, el("th", { scope: "col", rowspan: 2, class: "corner", text: "Worker" }));
      for (const g of groups) top.append(el("th", { scope: "colgroup", colspan: g.span, class: "layer", text: g.label }));
      top.append(el("th", { scope: "col", rowspan: 2, class: "num", text: "Modules" }));
      top.append(el("th", { scope: "col", rowspan: 2, text: "Task" }));
      const names = el("tr", {});
      for (const c of cols) {
        names.append(el("th", { scope: "col", class: "module", title: c.name, dataset: { module: c.name } }, el("span", { text: shortName(c.name) })));
      }
      const thead = el("thead", {}, top, names);

      const tbody = el("tbody", {});
      for (const a of trains) {
        const set = new Set(a.modules);
        const row = el("tr", { dataset: { worker: workerLabel(a), workerId: a.worker_id, status: a.status } });
        row.append(el("th", { scope: "row", class: "worker" }, workerLabel(a)));
        for (const c of cols) {
          const on = set.has(c.name);
          row.append(
            el(
              "td",
              {
                class: "cell " + (on ? "on" : "off"),
                dataset: { module: c.name, on: on },
                title: workerLabel(a) + (on ? " trains " : " leaves frozen ") + c.name,
              },
              el("span", { class: "sr-only", text: on ? "trains" : "frozen" }),
            ),
          );
        }
        row.append(el("td", { class: "num", text: a.modules.length + " / " + cols.length }));
        row.append(el("td", { class: "task" }, FP.badge(a.status), a.reason ? el("span", { class: "reason", text: a.reason }) : null));
        tbody.append(row);
      }
      const foot = el("tr", { class: "updates" }, el("th", { scope: "row", text: "updates so far" }));
      for (const c of cols) foot.append(el("td", { class: "count", title: c.name + ": updated in " + (c.update_count || 0) + " rounds", text: String(c.update_count || 0) }));
      foot.append(el("td", {}), el("td", {}));
      return [
        el("caption", { class: "sr-only", text: "Modules each worker trains in round " + round.number }),
        thead,
        tbody,
        el("tfoot", {}, foot),
      ];
    });
  }

  function renderMemory(job, round) {
    const list = $("memory");
    const trains = round ? round.assignments.filter((a) => a.kind === "train") : [];
    FP.setText("memory-round", roundTitle(round, job));
    $("memory-empty").hidden = trains.length > 0;
    list.dataset.rows = String(trains.length);
    const scale = Math.max(1, ...trains.map((a) => Math.max(a.budget_bytes || 0, a.predicted_bytes || 0, a.measured_peak_bytes || 0)));
    const pct = (n) => Math.max(0, Math.min(100, (100 * n) / scale)).toFixed(2) + "%";
    const key = JSON.stringify(trains.map((a) => [a.worker_id, a.worker_name, a.budget_bytes, a.predicted_bytes, a.measured_peak_bytes, a.modules.length, a.status]));
    FP.replace(list, key, () =>
      trains.map((a) => {
        const budget = a.budget_bytes;
        const measured = a.measured_peak_bytes;
        const over = budget && measured !== null && measured !== undefined && measured > budget;
        const track = el("div", { class: "mem-track", role: "img" });
        const budgetBar = el("div", { class: "mem-budget" });
        const predicted = el("div", { class: "mem-bar predicted" });
        const peak = el("div", { class: "mem-bar measured" + (over ? " over" : "") });
        budgetBar.style.width = pct(budget || 0);
        predicted.style.width = pct(a.predicted_bytes || 0);
        peak.style.width = pct(measured || 0);
        const marker = el("div", { class: "mem-marker" });
        marker.style.left = pct(budget || 0);
        track.append(budgetBar, predicted, peak, marker);
        const parts = [
          "measured peak " + (measured ? FP.bytes(measured) : "not yet"),
          "predicted " + FP.bytes(a.predicted_bytes),
          "budget " + (budget ? FP.bytes(budget) : "unknown"),
        ];
        track.setAttribute("aria-label", workerLabel(a) + ": " + parts.join(", "));
        const fit = budget && measured ? FP.pct(measured / budget) + " of budget" : "";
        return el(
          "li",
          {
            class: "mem-row" + (over ? " over" : ""),
            dataset: {
              worker: workerLabel(a),
              budget: budget || 0,
              predicted: a.predicted_bytes || 0,
              measured: measured || 0,
            },
          },
          el("div", { class: "mem-label" }, el("strong", { text: workerLabel(a) }), el("span", { class: "muted", text: " " + a.modules.length + " modules" })),
          track,
          el(
            "div",
            { class: "mem-text" },
            el("span", { class: "m-measured", text: parts[0] }),
            " · ",
            el("span", { class: "m-predicted", text: parts[1] }),
            " · ",
            el("span", { class: "m-budget", text: parts[2] }),
            fit ? el("span", { class: over ? "over-text" : "muted", text: " (" + fit + (over ? ", over budget" : "") + ")" }) : null,
          ),
        );
      }),
    );
  }

  // Each worker whose latest task of the job was refused or failed, with its reason:
  // a job sitting in profiling because its workers refuse says why here.
  function renderJobProblems(problems) {
    const box = $("job-problems");
    box.hidden = !problems.length;
    box.dataset.count = String(problems.length);
    FP.replace($("job-problems-list"), JSON.stringify(problems), () =>
      problems.map((p) =>
        el(
          "li",
          { dataset: { worker: p.worker_name || p.worker_id, reason: p.reason } },
          el("strong", { text: p.worker_name || p.worker_id.slice(0, 8) }),
          " ",
          ...FP.problem(p),
        ),
      ),
    );
  }

  function renderProblems(job, round, workers) {
    const box = $("problems");
    FP.setText("problems-round", roundTitle(round, job));
    const names = new Map(workers.map((w) => [w.id, w.name]));
    const stragglers = [];
    if (round) {
      for (const a of round.assignments) {
        if (a.worker_name) names.set(a.worker_id, a.worker_name);
      }
      const ids = new Set(round.straggler_ids);
      for (const a of round.assignments) if (a.status === "straggler") ids.add(a.worker_id);
      for (const id of ids) {
        const task = round.assignments.find((a) => a.worker_id === id && a.status === "straggler");
        stragglers.push({ id, name: names.get(id) || id.slice(0, 8), kind: task ? task.kind : "train", reason: task && task.reason ? task.reason : "missed the round deadline" });
      }
    }
    const refused = round ? round.assignments.filter((a) => a.status === "refused") : [];
    const rejections = round ? round.rejections : [];
    box.dataset.stragglers = String(stragglers.length);
    box.dataset.rejections = String(rejections.length);
    box.dataset.refused = String(refused.length);
    const key = JSON.stringify([round && round.number, stragglers, refused.map((a) => [a.worker_id, a.reason]), rejections]);
    FP.replace(box, key, () => {
      if (!round) return [el("p", { class: "empty", text: "No round yet." })];
      const out = [];
      if (!stragglers.length && !refused.length && !rejections.length) {
        out.push(el("p", { class: "empty ok-text", text: "None in round " + round.number + ": every assigned worker delivered in time and every upload was accepted." }));
        return out;
      }
      if (stragglers.length) {
        out.push(el("h3", { text: "Stragglers (" + stragglers.length + ")" }));
        out.push(
          el(
            "ul",
            { class: "problems", id: "stragglers" },
            ...stragglers.map((s) => el("li", { dataset: { worker: s.name, workerId: s.id } }, el("strong", { text: s.name }), " ", el("span", { class: "muted", text: s.kind + " task" }), ": " + s.reason)),
          ),
        );
      }
      if (refused.length) {
        out.push(el("h3", { text: "Refused tasks (" + refused.length + ")" }));
        out.push(
          el(
            "ul",
            { class: "problems", id: "refused" },
            ...refused.map((a) => el("li", { dataset: { worker: workerLabel(a) } }, el("strong", { text: workerLabel(a) }), ": " + (a.reason || "refused"))),
          ),
        );
      }
      if (rejections.length) {
        out.push(el("h3", { text: "Rejected uploads (" + rejections.length + ")" }));
        out.push(
          el(
            "ul",
            { class: "problems", id: "rejections" },
            ...rejections.map((r) =>
              el(
                "li",
                { dataset: { reason: r.reason } },
                el("time", { datetime: r.at, class: "muted", text: FP.time(r.at) }),
                " ",
                el("strong", { text: r.worker_id ? names.get(r.worker_id) || r.worker_id.slice(0, 8) : "unknown sender" }),
                " ",
                el("code", { class: "reason-code", text: r.reason }),
                ": " + r.message,
              ),
            ),
          ),
        );
      }
      return out;
    });
  }

  // ---- adapter download -----------------------------------------------------------------

  async function downloadAdapter() {
    const button = $("adapter-download");
    button.disabled = true;
    try {
      const response = await fetch("/api/v1/jobs/" + jobId + "/adapter", { headers: FP.headers(), cache: "no-store" });
      if (!response.ok) {
        let detail = response.statusText;
        try {
          detail = (await response.json()).detail || detail;
        } catch (e) {
          /* not JSON */
        }
        throw new FP.ApiError(response.status, detail);
      }
      const blob = await response.blob();
      const version = response.headers.get("X-Fedpilot-Adapter-Version") || "latest";
      const link = el("a", { href: URL.createObjectURL(blob), download: "fedpilot-" + jobId.slice(0, 8) + "-v" + version + ".zip" });
      document.body.append(link);
      link.click();
      link.remove();
      window.setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) {
      window.alert("Adapter download failed: " + (error.detail || error.message));
    } finally {
      button.disabled = false;
    }
  }

  // ---- the loop ----------------------------------------------------------------------

  async function tick() {
    let job;
    try {
      job = await FP.api("/api/v1/jobs/" + jobId);
    } catch (error) {
      if (error instanceof FP.ApiError && error.status === 404) {
        page.dataset.state = "missing";
        FP.setText("job-name", "No such job");
        FP.setBadge($("job-state"), "missing");
        const box = $("job-error");
        box.hidden = false;
        box.textContent = "The coordinator has no job " + jobId + ".";
        return 10000;
      }
      throw error;
    }
    latestJob = job;
    const number = shownRound(job);
    const [round, workers] = await Promise.all([
      number ? FP.api("/api/v1/jobs/" + jobId + "/rounds/" + number) : Promise.resolve(null),
      FP.api("/api/v1/workers"),
    ]);
    renderHeader(job);
    renderStrip(job);
    renderCurves(job);
    renderRoundsTable(job);
    renderHeatmap(job, round);
    renderMemory(job, round);
    renderProblems(job, round, workers);
    FP.renderWorkers($("workers-body"), workers);
    return FP.TERMINAL.has(job.state) ? 5 * FP.POLL_MS : FP.POLL_MS;
  }

  document.addEventListener("DOMContentLoaded", () => {
    page = $("job-page");
    jobId = page.dataset.jobId;
    $("follow-latest").addEventListener("click", () => {
      selected = null;
      FP.refresh();
    });
    $("adapter-download").addEventListener("click", downloadAdapter);
    FP.poll(tick);
  });
})();
