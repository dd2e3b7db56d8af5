/* fedpilot dashboard: the jobs list and the connected workers, refreshed every ~2 s. */
(function () {
  "use strict";

  const FP = window.fedpilot;
  const el = FP.el;

  function jobRow(job) {
    const href = "/jobs/" + encodeURIComponent(job.id);
    return el(
      "tr",
      { dataset: { jobId: job.id, state: job.state } },
      el(
        "th",
        { scope: "row" },
        el("a", { href, class: "job-link", text: job.name }),
        el("div", { class: "sub mono", text: job.id.slice(0, 8) }),
      ),
      el("td", {}, FP.badge(job.state), job.error ? el("div", { class: "sub over-text", title: job.error, text: job.error }) : null),
      el("td", { class: "num", dataset: { round: job.current_round } }, job.current_round + " / " + job.rounds),
      el("td", { text: job.strategy || "–" }),
      el("td", { class: "num accuracy", text: FP.pct(job.eval_accuracy) }),
      FP.timeCell(job.created_at),
      FP.timeCell(job.updated_at),
    );
  }

  async function tick() {
    const [jobs, workers] = await Promise.all([FP.api("/api/v1/jobs"), FP.api("/api/v1/workers")]);
    const body = FP.$("jobs-body");
    FP.replace(body, JSON.stringify(jobs), () => {
      if (!jobs.length) {
        return [
          el(
            "tr",
            { class: "placeholder" },
            el("td", { colspan: 7 }, "No jobs yet. Submit one with ", el("code", { text: "fedpilot submit job.yaml" }), " or POST /api/v1/jobs."),
          ),
        ];
      }
      return jobs.map(jobRow);
    });
    const active = jobs.filter((j) => !FP.TERMINAL.has(j.state)).length;
    FP.setText("jobs-count", jobs.length + (jobs.length === 1 ? " job" : " jobs") + (active ? ", " + active + " active" : ""));
    const alive = workers.filter((w) => w.alive).length;
    FP.setText("workers-count", alive + " of " + workers.length + " connected");
    FP.renderWorkers(FP.$("workers-body"), workers);
  }

  document.addEventListener("DOMContentLoaded", () => FP.poll(tick));
})();
