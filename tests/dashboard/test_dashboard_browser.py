"""The dashboard in a real browser: headless Chromium against a live coordinator.

The live test runs a real federation (coordinator and two workers as processes,
the tiny random BERT) and watches one page update while the job runs: the
heatmap fills in, accuracy points appear round by round, memory bars show each
worker's budget against predicted and measured peak. Every request the page
makes must go to the coordinator itself (the dashboard works offline).

Set ``FEDPILOT_DASHBOARD_SCREENSHOT=/some/file.png`` to get a copy of the final
screenshot outside the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.coordinator.db.models import Task
from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKEN = "dashboard-test-token-0123456789"
LABELS = ["class0", "class1", "class2"]
ROUNDS = 4


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # a setup failure, never a pass: .ci/run installs it
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@dataclass
class Tab:
    """A page plus everything it did that a test may want to assert on."""

    page: Page
    base: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def console(self, msg: ConsoleMessage) -> None:
        # A 401 answer is logged by Chromium as a failed resource load; that one is expected.
        if msg.type == "error" and "401" not in msg.text:
            self.errors.append(msg.text)

    def request(self, req: Request) -> None:
        if not (req.url.startswith(self.base + "/") or req.url.startswith(("data:", "blob:"))):
            self.foreign.append(req.url)

    def data(self, selector: str, name: str) -> str:
        value = self.page.get_attribute(selector, f"data-{name}")
        assert value is not None, f"{selector} has no data-{name}"
        return value


def open_tab(browser: Browser, base: str) -> Tab:
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, locale="en-GB")
    page = context.new_page()
    tab = Tab(page, base)
    page.on("console", tab.console)
    page.on("pageerror", lambda e: tab.errors.append(f"uncaught: {e}"))
    page.on("request", tab.request)
    page.set_default_timeout(20_000)
    return tab


def close_tab(tab: Tab) -> None:
    tab.page.context.close()
    assert tab.errors == [], tab.errors
    assert tab.foreign == [], f"the page reached beyond the coordinator: {tab.foreign}"


@pytest.fixture()
def guarded(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """An in-process coordinator that demands a token (no workers: jobs stay waiting)."""
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        grpc_port=0,
        http_port=0,
        http_host="127.0.0.1",
        api_token=TOKEN,
        tick_seconds=0.2,
    )
    running = start(settings)
    yield running
    running.stop(grace=0.5)


# -- pages and assets without a browser ------------------------------------------------------


def test_pages_need_no_token_and_only_listed_assets_are_served(guarded) -> None:
    base = f"http://127.0.0.1:{guarded.http_port}"
    with httpx.Client(base_url=base) as http:
        assert http.get("/api/v1/jobs").status_code == 401
        for path in ("/", "/jobs/0b7e5f0e-8f5c-4a53-9d4b-4c1e2f3a4b5c"):
            page = http.get(path)
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp
            assert "<script>" not in page.text  # every script is a file: CSP without inline
            assert TOKEN not in page.text
        job_page = http.get("/jobs/0B7E5F0E-8F5C-4A53-9D4B-4C1E2F3A4B5C").text
        assert 'data-job-id="0b7e5f0e-8f5c-4a53-9d4b-4c1e2f3a4b5c"' in job_page
        bad = http.get("/jobs/%3Cscript%3Ealert(1)")
        assert bad.status_code == 404 and "<script>alert" not in bad.text
        assert "&lt;script&gt;alert(1)" in bad.text
        for asset in ("common.js", "charts.js", "job.js", "jobs.js", "dashboard.css"):
            got = http.get(f"/static/{asset}")
            assert got.status_code == 200 and got.headers["x-content-type-options"] == "nosniff"
        for sneaky in ("routes.py", "__init__.py", "..%2Froutes.py", "../routes.py", "%2e%2e"):
            assert http.get(f"/static/{sneaky}").status_code == 404, sneaky
        paths = http.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert not [
            p
            for p in paths.json()["paths"]
            if not p.startswith(("/api/", "/healthz", "/readyz", "/metrics"))
        ]


# -- the token prompt ------------------------------------------------------------------------


def test_token_prompt_on_401_then_the_page_works_with_the_token(browser, guarded) -> None:
    base = f"http://127.0.0.1:{guarded.http_port}"
    spec = {"name": "guarded-job", "labels": ["a", "b", "c"], "rounds": 3}
    created = httpx.post(
        f"{base}/api/v1/jobs", json=spec, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    tab = open_tab(browser, base)
    page = tab.page
    page.goto(base + "/")
    banner = page.locator("#auth-banner")
    banner.wait_for(state="visible")
    assert "401" in banner.inner_text() and "API token" in banner.inner_text()
    assert tab.data("#auth-banner", "reason") == "missing"
    assert page.locator("tr[data-job-id]").count() == 0  # nothing leaks without the token
    assert page.evaluate("document.activeElement.id") == "token-input"

    page.fill("#token-input", "wrong-token")
    page.click("#token-save")
    page.wait_for_selector('#auth-banner[data-reason="refused"]')
    assert "refused" in banner.inner_text()

    page.fill("#token-input", TOKEN)
    page.press("#token-input", "Enter")
    banner.wait_for(state="hidden")
    link = page.locator(f'tr[data-job-id="{job_id}"] a[href="/jobs/{job_id}"]')
    link.wait_for()
    assert link.inner_text() == "guarded-job"
    assert page.input_value("#token-input") == ""  # the field does not keep showing it
    assert page.locator("#token-clear").is_visible()

    # The token lives in this tab's sessionStorage, so the job page opens authorised.
    link.click()
    page.wait_for_url(f"{base}/jobs/{job_id}")
    page.wait_for_selector('#job-state[data-state="waiting"]')
    assert page.inner_text("#job-name") == "guarded-job"
    assert page.locator("#round-strip .round-cell").count() == 3
    assert page.is_hidden("#auth-banner")
    assert page.evaluate("sessionStorage.getItem('fedpilot.apiToken')") == TOKEN

    # Forgetting it brings the prompt back.
    page.click("#token-clear")
    banner.wait_for(state="visible")
    assert tab.data("#auth-banner", "reason") == "missing"
    close_tab(tab)


def test_stragglers_refusals_and_rejections_are_listed_with_their_reasons(
    browser, guarded, tmp_path: Path
) -> None:
    """A round as the store records it when things go wrong, shown as the operator sees it."""
    base = f"http://127.0.0.1:{guarded.http_port}"
    store = guarded.store
    spec = {"name": "troubled", "labels": ["a", "b"], "rounds": 2, "min_workers": 50}
    job_id = httpx.post(
        f"{base}/api/v1/jobs", json=spec, headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()["id"]
    mib = 1 << 20
    ok, slow, tiny, oom = (
        store.register_worker(name, {}, {"kind": "cpu", "name": "cpu"}, budget)[0]
        for name, budget in (
            ("ok", 64 * mib),
            ("slow", 64 * mib),
            ("tiny", 2 * mib),
            ("oom", 64 * mib),
        )
    )
    modules = ["encoder.layer.0.query", "encoder.layer.1.query", "classifier"]

    def task(
        worker: str, chosen: list[str], status: str, reason: str | None = None, kind="train"
    ) -> Task:
        return Task(
            id=str(uuid.uuid4()),
            job_id=job_id,
            round=1,
            worker_id=worker,
            kind=kind,
            modules=chosen,
            predicted_bytes=40 * mib if chosen else 0,
            scores={},
            status=status,
            reason=reason,
        )

    slow_task = task(slow, modules[1:], "offered")
    hostile = '<img src=x onerror="document.body.dataset.pwned=1">'
    # How the gRPC service stores a worker's RefuseTask (reason, then its message).
    oom_task = task(
        oom, [], "refused", f"ERROR_REASON_OUT_OF_MEMORY: CUDA out of memory {hostile}", "profile"
    )
    store.open_round(
        job_id,
        1,
        state="training",
        participants=[ok, slow, tiny, oom],
        deadline_at=datetime.now(UTC) + timedelta(hours=1),
        tasks=[
            task(ok, modules, "offered"),
            slow_task,
            task(tiny, [], "refused", "no fit"),
            oom_task,
        ],
    )  # `ok` keeps training, so the round driver leaves this round alone
    store.set_task_status(slow_task.id, "straggler", "missed the round deadline")
    store.set_round(job_id, 1, stragglers=[slow])
    store.record_rejection(
        "stale_round",
        f"upload for a closed round {hostile}",
        job_id=job_id,
        round_number=1,
        worker_id=tiny,
    )

    tab = open_tab(browser, base)
    page = tab.page
    page.goto(f"{base}/jobs/{job_id}")
    page.fill("#token-input", TOKEN)
    page.press("#token-input", "Enter")
    page.wait_for_selector('#job-state[data-state="training"]')
    page.wait_for_selector('#problems[data-stragglers="1"][data-rejections="1"]')
    assert page.inner_text('#stragglers li[data-worker="slow"]').endswith(
        "missed the round deadline"
    )
    assert "no fit" in page.inner_text('#refused li[data-worker="tiny"]')
    rejection = page.locator('#rejections li[data-reason="stale_round"]')
    assert "tiny" in rejection.inner_text() and hostile in rejection.inner_text()
    # The job says which workers' latest task did not complete, and why; so do the
    # workers' rows (the worker's own reason code, or the coordinator's note).
    page.wait_for_selector('#job-problems[data-count="3"]')
    problem = page.locator('#job-problems li[data-worker="oom"]')
    assert problem.get_attribute("data-reason") == "OUT_OF_MEMORY"
    assert "round 1 profile: CUDA out of memory " + hostile in problem.inner_text()
    tiny_problem = '#job-problems li[data-worker="tiny"][data-reason="refused"]'
    assert page.inner_text(tiny_problem).endswith("round 1 train: no fit")
    assert page.locator('#job-problems li[data-worker="slow"][data-reason="straggler"]').count()
    assert page.locator('#job-problems li[data-worker="ok"]').count() == 0
    cell = page.locator('#workers-body tr[data-worker="oom"] td.worker-problem')
    assert cell.get_attribute("data-reason") == "OUT_OF_MEMORY"
    assert "CUDA out of memory" in cell.inner_text()
    assert page.locator('#workers-body tr[data-worker="ok"] td.worker-problem').count() == 0
    assert page.evaluate("document.body.dataset.pwned") is None  # shown as text, never markup

    # Before any profile the heatmap's columns are the assigned modules; rows show status.
    heatmap = page.locator("#heatmap")
    assert tab.data("#heatmap", "columns") == "3" and tab.data("#heatmap", "cells") == "5"
    assert heatmap.locator('tr[data-worker="ok"] td.cell[data-on="true"]').count() == 3
    assert heatmap.locator('tr[data-worker="slow"]').get_attribute("data-status") == "straggler"
    assert "no fit" in heatmap.locator('tr[data-worker="tiny"] td.task').inner_text()
    assert page.inner_text('#memory li[data-worker="ok"] .m-measured') == "measured peak not yet"
    assert tab.data('#round-strip .round-cell[data-round="1"]', "state") == "training"
    page.screenshot(path=str(tmp_path / "dashboard-problems.png"), full_page=True)
    close_tab(tab)


# -- a live federated job ---------------------------------------------------------------------


def _csv(path: Path, n: int, seed: int) -> Path:
    from fedpilot.worker.data import synthetic_dataset

    data = synthetic_dataset(n, len(LABELS), seed=seed)
    return write_csv(path, data.texts, [LABELS[y] for y in data.labels])


def _budgets(tiny_dir: Path) -> tuple[int, int]:
    """One budget fitting only the top of the model, one fitting everything (as test_cluster)."""
    from fedpilot.worker.model import ModelSpec, load_model
    from fedpilot.worker.profiling import dummy_batch, profile_memory

    spec = ModelSpec(
        model_path=str(tiny_dir),
        num_labels=len(LABELS),
        lora_rank=4,
        lora_alpha=8,
        max_seq_len=16,
        batch_size=8,
    )
    model = load_model(spec)
    memory = profile_memory(model, dummy_batch(model, 8, 16))
    top = [m.name for m in memory.modules if m.layer in (0, memory.num_layers)]
    return int(memory.cost(top) * 1.10), int(memory.full_cost() * 1.5)


def _job_file(tmp_path: Path, tiny_dir: Path) -> Path:
    spec = {
        "name": "dashboard-live",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": ROUNDS,
        "min_workers": 2,
        "local_steps": 6,
        "batch_size": 8,
        "max_seq_len": 16,
        "learning_rate": 0.01,
        "round_deadline_s": 90,
        "lora": {"rank": 4, "alpha": 8},
        "ig_probe_batches": 1,
        "eval_dataset": str(_csv(tmp_path / "eval.csv", 60, seed=9)),
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


SNAPSHOT = """() => {
  const q = (s) => document.querySelector(s);
  return {
    state: q('#job-page').dataset.state,
    round: +q('#job-page').dataset.round,
    points: +q('#chart-accuracy').dataset.points,
    cells: +q('#heatmap').dataset.cells,
    polls: +q('#last-updated').dataset.polls,
  };
}"""


def _watch(tab: Tab, cluster: LocalCluster, timeout_s: float, shots: Path) -> list[dict]:
    """Sample the page (never reloading it) until the job ends; keep one mid-run screenshot."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout_s
    live_shot = False
    while time.monotonic() < deadline:
        snap = tab.page.evaluate(SNAPSHOT)
        seen.append(snap)
        if snap["state"] in ("done", "failed", "cancelled"):
            return seen
        if not live_shot and snap["cells"] > 0 and snap["points"] >= 1:
            tab.page.screenshot(path=str(shots / "dashboard-live.png"), full_page=True)
            live_shot = True
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, (
                f"{name} exited: {(cluster.work_dir / (name + '.log')).read_text()[-3000:]}"
            )
        time.sleep(0.5)
    logs = (cluster.work_dir / "coordinator.log").read_text()[-4000:]
    raise AssertionError(f"job not finished after {timeout_s}s; last {seen[-1:]}; log:\n{logs}")


@pytest.mark.slow
def test_job_page_follows_a_live_federated_run(browser, tmp_path: Path, tiny_dir: Path) -> None:
    small, large = _budgets(tiny_dir)
    job_file = _job_file(tmp_path, tiny_dir)
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.start_coordinator(job=job_file)
        base = cluster.http_url
        (job,) = cluster.store.jobs()

        # Before any worker: the page is up, the job waits, nothing is plotted.
        tab = open_tab(browser, base)
        page = tab.page
        page.goto(f"{base}/jobs/{job.id}")
        page.wait_for_selector('#job-state[data-state="waiting"]')
        assert page.inner_text("#job-name") == "dashboard-live"
        assert page.locator("#round-strip .round-cell[data-state=pending]").count() == ROUNDS
        assert tab.data("#chart-accuracy", "points") == "0"
        assert tab.data("#heatmap", "cells") == "0" and page.is_hidden("#heatmap")
        assert page.is_visible("#heatmap-empty")

        cluster.start_worker("small", _csv(tmp_path / "a.csv", 120, seed=1), small, threads=1)
        cluster.start_worker("large", _csv(tmp_path / "b.csv", 120, seed=2), large, threads=1)
        seen = _watch(tab, cluster, timeout_s=240, shots=tmp_path)

        # It updated itself while the job ran: rounds and points only ever went up, and it
        # showed intermediate states (not just the empty page and the final one).
        final = seen[-1]
        assert final["state"] == "done", cluster.store.job(job.id).error
        rounds = [s["round"] for s in seen]
        points = [s["points"] for s in seen]
        assert rounds == sorted(rounds) and points == sorted(points)
        assert {0, ROUNDS} <= set(rounds) and len(set(rounds)) >= 3, rounds
        assert len(set(points)) >= 3, points
        assert final["polls"] > seen[0]["polls"]
        assert (tmp_path / "dashboard-live.png").exists()

        _check_final_job_page(tab, small, large)
        page.screenshot(path=str(tmp_path / "dashboard-job.png"), full_page=True)
        if target := os.environ.get("FEDPILOT_DASHBOARD_SCREENSHOT"):
            shutil.copyfile(tmp_path / "dashboard-job.png", target)
            live = Path(target).with_stem(Path(target).stem + "-live")
            shutil.copyfile(tmp_path / "dashboard-live.png", live)

        # The jobs list links to the job with its state, round and accuracy.
        page.goto(base + "/")
        row = page.locator(f'tr[data-job-id="{job.id}"]')
        row.wait_for()
        assert row.get_attribute("data-state") == "done"
        assert row.locator("td[data-round]").inner_text() == f"{ROUNDS} / {ROUNDS}"
        assert row.locator("td.accuracy").inner_text().endswith("%")
        assert "fedra" in row.inner_text()  # the strategy column: the default
        page.wait_for_selector('#workers-body tr[data-worker="small"]')
        page.screenshot(path=str(tmp_path / "dashboard-jobs.png"), full_page=True)
        row.locator(f'a[href="/jobs/{job.id}"]').click()
        page.wait_for_url(f"{base}/jobs/{job.id}")
        page.wait_for_selector('#job-state[data-state="done"]')
        close_tab(tab)


def _check_final_job_page(tab: Tab, small: int, large: int) -> None:
    page = tab.page
    assert page.inner_text("#job-state") == "done"
    assert page.is_hidden("#job-problems") and tab.data("#job-problems", "count") == "0"
    assert page.get_attribute("#round-progress", "value") == str(ROUNDS)
    assert page.locator("#round-strip .round-cell[data-state=closed]").count() == ROUNDS

    # Curves: one accuracy point per round, three loss series.
    assert tab.data("#chart-accuracy", "points") == str(ROUNDS)
    assert page.locator("#chart-accuracy circle.pt").count() == ROUNDS
    for series in ("eval_loss", "train_loss_before", "train_loss_after"):
        assert tab.data(f'#chart-loss g[data-series="{series}"]', "points") == str(ROUNDS)
    assert page.inner_text("#fact-accuracy").endswith("%")

    # Heatmap of the latest round: a row per training worker, a column per module.
    heatmap = page.locator("#heatmap")
    assert tab.data("#heatmap", "round") == str(ROUNDS)
    columns = int(tab.data("#heatmap", "columns"))
    assert columns > 2 and heatmap.locator("thead th.module").count() == columns
    rows = {name: heatmap.locator(f'tbody tr[data-worker="{name}"]') for name in ("small", "large")}
    assert heatmap.locator("tbody tr").count() == 2
    trained = {}
    for name, row in rows.items():
        assert row.locator("td.cell").count() == columns
        assert row.get_attribute("data-status") == "done"
        trained[name] = row.locator('td.cell[data-on="true"]').count()
        assert row.locator("td.task .badge").inner_text() == "done"
    assert 0 < trained["small"] < trained["large"], trained
    assert int(tab.data("#heatmap", "cells")) == trained["small"] + trained["large"]

    # Memory: budget against predicted and measured peak, per worker.
    assert tab.data("#memory", "rows") == "2"
    for name, budget in (("small", small), ("large", large)):
        row = f'#memory li[data-worker="{name}"]'
        assert int(tab.data(row, "budget")) == budget
        predicted, measured = int(tab.data(row, "predicted")), int(tab.data(row, "measured"))
        assert 0 < predicted <= budget and measured > 0
        assert "MiB" in page.inner_text(f"{row} .m-budget") or "KiB" in page.inner_text(
            f"{row} .m-budget"
        )
        label = page.get_attribute(f"{row} .mem-track", "aria-label") or ""
        assert "measured peak" in label and "budget" in label

    # Nothing went wrong in this run, and the page says so; bytes moved are counted.
    assert tab.data("#problems", "stragglers") == "0"
    assert tab.data("#problems", "rejections") == "0"
    assert int(tab.data("#bytes-total", "bytes")) > 0
    assert page.locator("#rounds-body tr[data-state=closed]").count() == ROUNDS
    assert page.locator('#workers-body tr[data-alive="true"]').count() == 2

    # An older round can be inspected, then the view follows the newest again.
    page.click('#round-strip .round-cell[data-round="1"]')
    page.wait_for_selector('#heatmap[data-round="1"]')
    assert page.get_attribute("#follow-latest", "aria-pressed") == "false"
    page.click("#follow-latest")
    page.wait_for_selector(f'#heatmap[data-round="{ROUNDS}"]')


def test_a_worker_refusing_its_tasks_shows_why_on_the_job_and_jobs_pages(
    browser, tmp_path: Path, tiny_dir: Path
) -> None:
    """A real worker whose data holds none of the job's labels refuses every task with a
    reason; the job page and the workers list show it (the job would otherwise just sit)."""
    spec = {
        "name": "wrong-data",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": 1,
        "min_workers": 1,
        "batch_size": 4,
        "max_seq_len": 16,
        "lora": {"rank": 4, "alpha": 8},
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    data = write_csv(tmp_path / "other.csv", [f"query {i}" for i in range(12)], ["elsewhere"] * 12)
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        cluster.start_worker("site-a", data, 2**30, threads=1)
        base = cluster.http_url
        (job,) = cluster.store.jobs()

        tab = open_tab(browser, base)
        page = tab.page
        page.goto(f"{base}/jobs/{job.id}")
        page.wait_for_selector('#job-problems[data-count="1"]', timeout=120_000)
        problem = page.locator('#job-problems li[data-worker="site-a"]')
        assert problem.get_attribute("data-reason") == "MALFORMED"
        text = problem.inner_text()
        assert "profile" in text and "none of its 12 examples has one of the job's labels" in text
        assert page.get_attribute("#job-page", "data-state") in ("waiting", "profiling")
        page.screenshot(path=str(tmp_path / "dashboard-refused.png"), full_page=True)

        page.goto(base + "/")
        cell = page.locator('#workers-body tr[data-worker="site-a"] td.worker-problem')
        cell.wait_for()
        assert cell.get_attribute("data-reason") == "MALFORMED"
        assert "none of its 12 examples" in cell.inner_text()
        close_tab(tab)
