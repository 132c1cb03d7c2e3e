"""The web dashboard end to end: a real cluster, the page in headless Chromium driven by Playwright.

Needs /usr/bin/chromium and the playwright package (scripts/install_browser.sh installs both).
Screenshots are kept in test-artifacts/dashboard/ for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, expect, sync_playwright

from mloc.localcluster import LocalCluster
from mloc.worker.reporter import Reporter
from tests.support.api import wait_for
from tests.support.clock import within_one_utc_day

TOKEN = "dashboard-admin-token"
A100 = "NVIDIA A100-SXM4-80GB"
YAML = {"Content-Type": "text/yaml"}
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(
        2,
        env={"ORCHESTRATOR_TOKEN": TOKEN},
        worker_env=[{"MLOC_WORKER_GPUS": f"{A100}:2:81920"}, {}],
    )


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page (empty localStorage) that records script errors and CSP violations."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    opened = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # A refused API call shows up as a failed resource load; the page reports it in words itself.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    opened.on("console", on_console)
    opened.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    opened.set_default_timeout(15_000)
    yield opened
    context.close()
    assert not problems, problems


@pytest.fixture
def admin(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
        yield client


def submit(http: httpx.Client, body: str) -> str:
    response = http.post("/api/v1/tasks", content=body, headers=YAML)
    assert response.status_code == 201, response.text
    return str(response.json()["task_id"])


def report(redis_url: str, task_id: str, events: list[dict[str, Any]]) -> None:
    """Hand events to the worker's own Reporter for a task, as an executor's would be.

    Run in a thread: Playwright's sync API owns this thread's event loop."""

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            reporter = Reporter(client, task_id, time.time())
            for event in events:
                reporter.handle(event)
            await reporter.close()
        finally:
            await client.aclose()

    thread = threading.Thread(target=asyncio.run, args=(write(),))
    thread.start()
    thread.join(10)


def write_log_lines(redis_url: str, task_id: str, lines: list[str]) -> None:
    """Append lines to a task's log; used for a line with markup in it, which the echo executor never writes."""
    report(redis_url, task_id, [{"ev": "log", "level": "INFO", "message": line, "ts": time.time()} for line in lines])


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    path.unlink(missing_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, path
    return path


def sign_in(page: Page, token: str) -> None:
    page.fill("#token-input", token)
    page.click("#token-save")


@pytest.mark.extra("browser")
def test_dashboard_follows_tasks_workers_and_usage(
    cluster: LocalCluster, admin: httpx.Client, page: Page, redis_url: str
) -> None:
    # The usage chart is checked for today's bar (UTC): the tasks must end on the day it is drawn.
    within_one_utc_day(300)
    quick = [submit(admin, "taskType: echo\nmetadata: {name: quick-one}\npayload: {n: 1}\n") for _ in range(2)]
    for task_id in quick:
        wait_for(admin, task_id, {"succeeded"})
    slow = submit(admin, "taskType: echo\nmetadata: {name: slow-one}\nhyperparameters: {sleep_sec: 8, steps: 8}\n")
    wait_for(admin, slow, {"running"})

    # Without a token the page says what is missing instead of showing an empty list.
    page.goto(cluster.api_url + "/dashboard")
    expect(page.locator("#message")).to_contain_text("This orchestrator needs a token")

    sign_in(page, TOKEN)
    expect(page.locator("#message")).to_be_hidden()
    rows = page.locator("#task-rows tr[data-task-id]")
    expect(rows).to_have_count(3)
    for task_id in [*quick, slow]:
        expect(page.locator(f'#task-rows tr[data-task-id="{task_id}"]')).to_be_visible()
    expect(page.locator("#task-rows a.task-link", has_text="slow-one")).to_be_visible()
    expect(page.locator("#task-summary")).to_have_text("Page 1 of 1 · 3 tasks")
    shot(page, "tasks")

    page.select_option("#filter-state", "succeeded")
    expect(page).to_have_url(re.compile(r"#/tasks\?state=succeeded"))
    expect(rows).to_have_count(2)
    expect(page.locator('#task-rows tr[data-state="succeeded"]')).to_have_count(2)
    page.select_option("#filter-state", "running")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#task-rows tr[data-task-id="{slow}"]')).to_be_visible()
    # The token survives a reload (localStorage), and so does the filter (it lives in the URL).
    page.reload()
    expect(rows).to_have_count(1)

    page.click(f'#task-rows tr[data-task-id="{slow}"] a.task-link')
    expect(page).to_have_url(re.compile(f"#/task/{slow}$"))
    expect(page.locator(".task-head h1")).to_contain_text("slow-one")
    expect(page.locator("#log-state")).to_have_text("following…")
    logs = page.locator("#task-logs .log-line")
    # The lifecycle, then the executor's own lines, arrive while the task runs.
    expect(logs.first).to_contain_text("assigned to local-")
    expect(page.locator("#task-logs .log-line", has_text="step 1/8")).to_have_count(1)
    # Log text is shown as text, never parsed as markup.
    write_log_lines(redis_url, slow, ["loss=2.31 <script>alert(1)</script>"])
    expect(page.locator("#task-logs .log-line", has_text="loss=2.31 <script>alert(1)</script>")).to_have_count(1)
    assert page.locator("#task-logs script").count() == 0
    expect(page.locator("#progress-text")).to_contain_text(re.compile(r"\d/8 · \d+(\.\d)?% · ETA"))
    percent = float(page.locator("#task-progress [role=progressbar]").get_attribute("aria-valuenow") or "0")
    assert 0 < percent < 100
    assert admin.get(f"/api/v1/tasks/{slow}").json()["state"] == "running"  # the lines arrived live
    shot(page, "task-running")

    # assigned, started, 8 steps, the line written above, succeeded.
    expect(page.locator("#log-state")).to_have_text("ended (succeeded) · 12 lines", timeout=30_000)
    expect(logs.nth(-2)).to_contain_text("step 8/8")
    expect(logs.last).to_contain_text("succeeded in")
    expect(page.locator(".task-head [data-state]")).to_have_text("succeeded")
    expect(page.locator("#task-result pre")).to_contain_text(re.compile(r'"worker_id": "local-\d"'))
    expect(page.locator("#task-details")).to_contain_text("1 of 3")
    shot(page, "task-done")

    page.click('nav a[data-nav="workers"]')
    expect(page.locator("#worker-rows tr[data-worker-id]")).to_have_count(2)
    gpu_worker = page.locator('#worker-rows tr[data-worker-id="local-1"]')
    expect(gpu_worker.locator(f'li[data-gpu-model="{A100}"]')).to_have_count(2)
    expect(gpu_worker.locator("li.gpu.free")).to_have_count(2)
    expect(gpu_worker).to_contain_text("NVIDIA A100-SXM4-80GB · 80 GiB")
    expect(gpu_worker).to_contain_text(re.compile(r"heartbeat .* ago"))
    expect(page.locator("#worker-summary")).to_contain_text(f"{A100}: 2 of 2 GPUs free")
    expect(page.locator('#worker-rows tr[data-worker-id="local-2"]')).to_contain_text("none")
    shot(page, "workers")

    page.click('nav a[data-nav="usage"]')
    today = datetime.now(UTC).date().isoformat()
    chart = page.locator('svg.chart[data-user="admin"]')
    expect(chart).to_be_visible()
    bar = chart.locator(f'rect.bar[data-day="{today}"]')
    expect(bar).to_have_attribute("data-value", "3")
    assert float(bar.get_attribute("height") or "0") > 0
    expect(chart.locator("rect.bar")).to_have_count(14)
    expect(page.locator('section.usage[data-user="admin"]')).to_contain_text("3 tasks")
    page.select_option("#usage-counter", "wall_sec")
    expect(page).to_have_url(re.compile(r"counter=wall_sec"))
    expect(page.locator('svg.chart[data-user="admin"]')).to_have_attribute(
        "aria-label", "wall seconds per day for admin"
    )
    page.select_option("#usage-counter", "tasks")
    expect(chart.locator(f'rect.bar[data-day="{today}"]')).to_have_attribute("data-value", "3")
    shot(page, "usage")

    assert {p.name for p in ARTIFACTS.glob("*.png")} >= {
        "tasks.png",
        "task-running.png",
        "task-done.png",
        "workers.png",
        "usage.png",
    }


@pytest.mark.extra("browser")
def test_wrong_token_is_named_on_the_page(cluster: LocalCluster, admin: httpx.Client, page: Page) -> None:
    submit(admin, "taskType: echo\n")
    page.goto(cluster.api_url + "/dashboard")
    sign_in(page, "not-the-token")
    message = page.locator("#message")
    expect(message).to_contain_text("The orchestrator refused this token: invalid token")
    expect(message).to_contain_text("Enter a valid token above")
    expect(page.locator("#task-rows tr[data-task-id]")).to_have_count(0)
    expect(page.locator("#token-state")).to_have_text("token saved in this browser")
    shot(page, "wrong-token")

    sign_in(page, TOKEN)
    expect(message).to_be_hidden()
    expect(page.locator("#task-rows tr[data-task-id]")).to_have_count(1)


@pytest.mark.extra("browser")
def test_without_auth_the_page_shows_reasons_and_filters_by_owner_and_type(
    make_cluster: Callable[..., LocalCluster], page: Page
) -> None:
    cluster = make_cluster(1)
    with httpx.Client(base_url=cluster.api_url, timeout=10) as anyone:
        failed = submit(anyone, "taskType: echo\nhyperparameters: {fail_message: 'the payload was empty; give one'}\n")
        wait_for(anyone, failed, {"failed"})
        waiting = submit(anyone, "taskType: echo\nresources: {hardware: {gpu: {type: H100, count: 1}}}\n")
        wait_for(anyone, waiting, {"pending"})
    page.goto(cluster.api_url + "/dashboard")
    rows = page.locator("#task-rows tr[data-task-id]")
    expect(rows).to_have_count(2)
    expect(page.locator("#message")).to_be_hidden()
    expect(page.locator(f'#task-rows tr[data-task-id="{failed}"] td.note')).to_have_text(
        "the payload was empty; give one"
    )
    expect(page.locator(f'#task-rows tr[data-task-id="{waiting}"] td.note')).to_contain_text(
        "unschedulable: no registered worker can run this task"
    )

    page.fill("#filter-type", "inference")
    page.click("#task-filters button[type=submit]")
    expect(page.locator("#task-rows td.empty")).to_have_text("No tasks match.")
    page.fill("#filter-type", "echo")
    page.fill("#filter-owner", "someone-else")
    drawn = page.locator("#task-filters").element_handle()
    page.click("#task-filters button[type=submit]")
    # The view is drawn anew for the new filter: the last one's "No tasks match." must not answer for it,
    # nor its form take the next filter (the new form would then show this one).
    drawn.wait_for_element_state("hidden")
    expect(page).to_have_url(re.compile(r"owner=someone-else&task_type=echo"))
    expect(page.locator("#task-rows td.empty")).to_be_visible()
    page.fill("#filter-owner", "admin")
    page.click("#task-filters button[type=submit]")
    expect(page).to_have_url(re.compile(r"owner=admin&task_type=echo"))
    expect(rows).to_have_count(2)

    page.click(f'#task-rows tr[data-task-id="{waiting}"] a.task-link')
    expect(page.locator("#task-pending-reason")).to_contain_text(
        "Unschedulable: no registered worker can run this task"
    )
    expect(page.locator("#task-details")).to_contain_text("1\u00d7 H100 GPU")
    expect(page.locator("#task-cancel")).to_be_visible()
    page.go_back()
    page.click(f'#task-rows tr[data-task-id="{failed}"] a.task-link')
    expect(page.locator("#task-reason")).to_contain_text("the payload was empty; give one (executor_error)")
    # A task that failed at once has a log that says why: assigned, started, failed.
    expect(page.locator("#log-state")).to_have_text("ended (failed) · 3 lines")
    expect(page.locator("#task-logs .log-line").last).to_contain_text("the payload was empty; give one")


def test_dashboard_files_are_served_with_a_strict_policy(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": TOKEN})  # no token: the page and its files hold no data
    page = httpx.get(cluster.api_url + "/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    script = httpx.get(cluster.api_url + "/dashboard/static/main.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    # Revalidated on each load: a file the browser holds comes back 304 without a body; a changed one whole.
    for url, first in ((cluster.api_url + "/dashboard", page), (cluster.api_url + "/dashboard/static/main.js", script)):
        held = httpx.get(url, headers={"If-None-Match": first.headers["etag"]}, timeout=10)
        assert held.status_code == 304 and held.content == b"" and held.headers["etag"] == first.headers["etag"]
        assert held.headers["cache-control"] == "no-cache"
        changed = httpx.get(url, headers={"If-None-Match": '"something-else"'}, timeout=10)
        assert changed.status_code == 200 and changed.content == first.content
    for bad in ("/dashboard/static/..%2F..%2Fapp.py", "/dashboard/static/.hidden.js", "/dashboard/static/missing.js"):
        response = httpx.get(cluster.api_url + bad, timeout=10)
        assert response.status_code == 404, bad


def wait_ended(http: httpx.Client, task_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    return [wait_for(http, task_id, {"succeeded", "failed", "cancelled"}, timeout=timeout) for task_id in task_ids]


def style(locator: Locator, prop: str) -> str:
    return str(locator.evaluate("(el, prop) => getComputedStyle(el)[prop]", prop))


@pytest.mark.extra("browser")
def test_task_page_draws_its_pipeline_with_live_states_and_links_each_step(
    make_cluster: Callable[..., LocalCluster], page: Page
) -> None:
    cluster = make_cluster(1)
    steps = [
        {"metadata": {"name": "fetch"}, "spec": {"taskType": "echo", "hyperparameters": {"sleep_sec": 4, "steps": 4}}},
        {"metadata": {"name": "tune"}, "spec": {"taskType": "echo", "dependsOn": ["fetch"]}},
        {
            "metadata": {"name": "report"},
            "spec": {"taskType": "echo", "dependsOn": ["tune"], "hyperparameters": {"fail_message": "no report today"}},
        },
    ]
    with httpx.Client(base_url=cluster.api_url, timeout=10) as anyone:
        answer = anyone.post("/api/v1/tasks/bulk", content=yaml.safe_dump_all(steps), headers=YAML)
        assert answer.status_code == 201, answer.text
        ids = {task["name"]: task["task_id"] for task in answer.json()["tasks"]}
        wait_for(anyone, ids["fetch"], {"running"})

        page.goto(f"{cluster.api_url}/dashboard#/task/{ids['tune']}")
        graph = page.locator("#pipeline-graph")

        def box(name: str) -> Locator:
            return graph.locator(f'a.node[data-task-id="{ids[name]}"]')

        expect(graph.locator("a.node")).to_have_count(3)
        expect(graph.locator("line.edge")).to_have_count(2)
        expect(box("fetch")).to_have_attribute("data-state", "running")
        expect(box("tune")).to_have_attribute("data-state", "pending")
        expect(box("report")).to_have_attribute("data-state", "pending")
        # A column per depth, the edges from what a step waits for to the step, the page's own step outlined.
        assert [box(name).get_attribute("data-column") for name in ("fetch", "tune", "report")] == ["0", "1", "2"]
        assert {
            (edge.get_attribute("data-from"), edge.get_attribute("data-to"))
            for edge in graph.locator("line.edge").all()
        } == {
            (ids["fetch"], ids["tune"]),
            (ids["tune"], ids["report"]),
        }
        expect(box("tune")).to_have_class(re.compile(r"\bcurrent\b"))
        expect(box("tune")).to_contain_text("tune")
        expect(page.locator("#task-pipeline .badge")).to_have_text("running")
        shot(page, "pipeline-running")

        # The graph follows the pipeline live, past the end of the page's own step.
        expect(box("fetch")).to_have_attribute("data-state", "succeeded", timeout=20_000)
        expect(box("report")).to_have_attribute("data-state", "failed", timeout=20_000)
        expect(box("tune")).to_have_attribute("data-state", "succeeded")
        expect(page.locator("#task-pipeline .badge")).to_have_text("failed")
        expect(page.locator("#pipeline-summary")).to_contain_text("3 of 3 steps ended")
        assert anyone.get(f"/api/v1/pipelines/{answer.json()['tasks'][0]['pipeline_id']}").json()["state"] == "failed"
    # Boxes take the colours of the state badges the task list shows.
    header_badge = page.locator(".task-head .badge")
    expect(header_badge).to_have_text("succeeded")
    assert style(box("tune").locator("rect"), "fill") == style(header_badge, "backgroundColor")
    assert style(box("report").locator("rect"), "fill") != style(header_badge, "backgroundColor")
    shot(page, "pipeline-done")

    box("report").click()
    expect(page).to_have_url(re.compile(f"#/task/{ids['report']}$"))
    expect(page.locator(".task-head h1")).to_contain_text("report")
    expect(page.locator("#task-reason")).to_contain_text("no report today")
    expect(page.locator("#task-pipeline a.node.current")).to_have_attribute("data-task-id", ids["report"])
    assert style(page.locator(".task-head .badge"), "backgroundColor") == style(box("report").locator("rect"), "fill")


def sft_task(name: str, learning_rate: float) -> str:
    """The packaged CPU SFT example, shortened, logging every other step and evaluating on a held-out share."""
    task = yaml.safe_load((Path(__file__).resolve().parents[1] / "templates" / "cpu" / "sft.yaml").read_text())
    task["metadata"] = {"name": name}
    task["spec"]["dataset"] = {"examples": task["spec"]["dataset"]["examples"] * 2, "eval_ratio": 0.25}
    task["spec"]["hyperparameters"].update(
        {"max_steps": 8, "logging_steps": 2, "eval_steps": 4, "learning_rate": learning_rate, "save_steps": 100}
    )
    return json.dumps(task)  # YAML would write the repeated examples as aliases, which submit refuses


def series(page: Page, chart: str, metric: str, run: str) -> Locator:
    return page.locator(f'svg[data-chart="{chart}"] polyline[data-metric="{metric}"][data-run="{run}"]')


@pytest.mark.extra("browser", "train")
def test_training_curves_are_drawn_and_a_second_run_is_overlaid_dashed(
    make_cluster: Callable[..., LocalCluster], page: Page, redis_url: str
) -> None:
    cluster = make_cluster(1)
    with httpx.Client(base_url=cluster.api_url, timeout=10) as anyone:
        first = submit(anyone, sft_task("sft-slow", 0.0005))
        second = submit(anyone, sft_task("sft-fast", 0.005))
        # A GRPO task no worker takes (its tag is nowhere), whose reward and KL the test reports itself.
        grpo = submit(
            anyone,
            "taskType: grpo\nmetadata: {name: grpo-written}\n"
            "resources: {tags: [nowhere]}\n"
            "model: {source: {type: package, identifier: mloc-tiny-llama}}\n"
            "dataset: {examples: [{prompt: 'Say hi'}]}\n"
            "hyperparameters: {reward_funcs: [length], num_generations: 2, batch_size: 2}\n",
        )
        records = wait_ended(anyone, [first, second], timeout=300)
        assert [record["state"] for record in records] == ["succeeded", "succeeded"], records
        metrics = anyone.get(f"/api/v1/tasks/{first}/metrics").json()["metrics"]
    losses = [row for row in metrics if "loss" in row]
    evals = [row for row in metrics if "eval_loss" in row]
    assert len(losses) >= 4 and len(evals) >= 2, metrics

    page.goto(f"{cluster.api_url}/dashboard#/task/{first}")
    loss = series(page, "loss", "loss", first)
    expect(loss).to_have_attribute("data-points", str(len(losses)))
    expect(series(page, "loss", "eval_loss", first)).to_have_attribute("data-points", str(len(evals)))
    expect(series(page, "learning_rate", "learning_rate", first)).to_have_count(1)
    expect(page.locator('svg[data-chart="reward"]')).to_have_count(0)  # SFT reports no reward
    # Axes: round tick values, the largest loss within the y range.
    ticks = [
        float(text.replace("\u2212", "-"))
        for text in page.locator('svg[data-chart="loss"] .y-tick').all_text_contents()
    ]
    assert len(ticks) >= 3 and ticks == sorted(ticks)
    assert ticks[0] <= min(row["loss"] for row in losses) and ticks[-1] >= max(row["loss"] for row in losses)
    steps = [int(text) for text in page.locator('svg[data-chart="loss"] .x-tick').all_text_contents()]
    assert steps[0] <= 1 and steps[-1] >= 8
    expect(page.locator('figure[data-chart="loss"] .legend li')).to_have_text(["loss", "eval_loss"])
    expect(page.locator("polyline.dashed")).to_have_count(0)
    shot(page, "training-curves")

    page.fill("#compare-input", second)
    page.click("#compare-form button[type=submit]")
    expect(page).to_have_url(re.compile(f"#/task/{first}\\?compare={second}$"))
    expect(series(page, "loss", "loss", second)).to_have_class(re.compile(r"\bdashed\b"))
    expect(series(page, "loss", "loss", first)).not_to_have_class(re.compile(r"\bdashed\b"))
    expect(series(page, "learning_rate", "learning_rate", second)).to_have_count(1)
    expect(page.locator('figure[data-chart="loss"] .legend li')).to_have_text(
        ["loss · sft-slow", "eval_loss · sft-slow", "loss · sft-fast", "eval_loss · sft-fast"]
    )
    expect(page.locator("#metrics-note")).to_contain_text("dashed: sft-fast")
    # The learning rates differ tenfold, so the chart's range spans both runs.
    rate_ticks = page.locator('svg[data-chart="learning_rate"] .y-tick').all_text_contents()
    assert float(rate_ticks[-1].replace("\u2212", "-")) >= max(
        row["learning_rate"]
        for row in httpx.get(f"{cluster.api_url}/api/v1/tasks/{second}/metrics").json()["metrics"]
        if "learning_rate" in row
    )
    shot(page, "training-compared")

    # Reward and KL, as a GRPO trainer reports them, on their own chart.
    rows = [{"reward": 0.1 * step, "kl": 0.02 * step, "learning_rate": 1e-5, "loss": 0.5} for step in range(1, 6)]
    report(redis_url, grpo, [{"ev": "metrics", "step": step, "values": row} for step, row in enumerate(rows, 1)])
    page.goto(f"{cluster.api_url}/dashboard#/task/{grpo}")
    expect(series(page, "reward", "reward", grpo)).to_have_attribute("data-points", "5")
    expect(series(page, "reward", "kl", grpo)).to_have_attribute("data-points", "5")
    expect(page.locator('figure[data-chart="reward"] .legend li')).to_have_text(["reward", "kl"])
    shot(page, "training-reward")
    assert series(page, "reward", "reward", grpo).get_attribute("class") != series(
        page, "reward", "kl", grpo
    ).get_attribute("class")
    # A run that is not training is named, with what to do instead.
    page.fill("#compare-input", records[0]["task_id"][:8])
    page.click("#compare-form button[type=submit]")
    expect(page.locator("#metrics-note")).to_contain_text("Cannot compare:")
    expect(page.locator("#metrics-note")).to_contain_text("is not a task id")


MC_QUESTIONS = [
    {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), str(i), "zero"], "answer": i % 4}
    for i in range(8)
]


def eval_task(name: str, pick: Path, shared: Path) -> str:
    custom = [
        {"name": "pick", "path": str(pick), "type": "multiple_choice"},
        {"name": "arith", "path": str(shared), "type": "multiple_choice"},
    ]
    model = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
    spec = {"taskType": "eval", "model": model, "eval": {"custom": custom, "batch_size": 4}}
    return json.dumps({"apiVersion": "mloc/v1", "kind": "EvalTask", "metadata": {"name": name}, "spec": spec})


def score_text(value: float | None, stderr: float | None) -> str:
    return "—" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


@pytest.mark.extra("browser", "eval")
def test_eval_scores_are_a_table_and_two_runs_side_by_side(
    make_cluster: Callable[..., LocalCluster], page: Page, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    # Two choices the model cannot tell apart, so it takes the first: every answer right in one file and
    # every answer wrong in the other, whatever the weights. The shared file scores the same in both runs.
    for name, answer in (("right", 0), ("wrong", 1)):
        rows = [{"question": f"Pick one ({i}).", "choices": ["same", "same"], "answer": answer} for i in range(6)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "arith.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MC_QUESTIONS))
    cluster = make_cluster(1, env={"MLOC_MODEL_ROOTS": str(data)})
    with httpx.Client(base_url=cluster.api_url, timeout=30) as anyone:
        base = submit(anyone, eval_task("eval-right", data / "right.jsonl", data / "arith.jsonl"))
        other = submit(anyone, eval_task("eval-wrong", data / "wrong.jsonl", data / "arith.jsonl"))
        echo = submit(anyone, "taskType: echo\nmetadata: {name: not-an-eval}\n")
        records = wait_ended(anyone, [base, other, echo], timeout=300)
        assert [record["state"] for record in records] == ["succeeded"] * 3, records
        scores = anyone.get(f"/api/v1/tasks/{base}/result").json()["scores"]
        compared = anyone.get("/api/v1/evals/compare", params={"tasks": f"{base},{other}"}).json()

    page.goto(f"{cluster.api_url}/dashboard#/task/{base}")
    table = page.locator("#eval-scores")
    expect(table.locator("tbody tr")).to_have_count(4)  # acc and acc_norm of two tasks
    for task, metrics in scores.items():
        for metric in ("acc", "acc_norm"):
            cell = table.locator(f'tr[data-task="{task}"][data-metric="{metric}"] td').nth(2)
            expect(cell).to_have_text(score_text(metrics[metric], metrics[f"{metric}_stderr"]))
    expect(table.locator('tr[data-task="pick"][data-metric="acc"]')).to_contain_text("1.0000 ± 0.0000")
    shot(page, "eval-scores")

    page.fill("#compare-input", other)
    page.click("#compare-form button[type=submit]")
    side = page.locator("#eval-compare")
    expect(side.locator("tbody tr")).to_have_count(len(compared["rows"]))
    expect(side.locator("thead th")).to_have_text(
        [
            "Task",
            "Metric",
            f"eval-right ({base[:8]})",
            f"eval-wrong ({other[:8]})",
            "Difference",
            "Combined stderr",
            "> 2 stderr?",
        ]
    )
    for row in compared["rows"]:
        shown = side.locator(f'tr[data-task="{row["task"]}"][data-metric="{row["metric"]}"]')
        cells = shown.locator("td")
        expect(cells.nth(2)).to_have_text(score_text(row["cells"][0]["value"], row["cells"][0]["stderr"]))
        expect(cells.nth(3)).to_have_text(score_text(row["cells"][1]["value"], row["cells"][1]["stderr"]))
        if row["significant"] is None:
            expect(cells.nth(6)).to_have_text("—")  # no call where the standard errors measure no spread
            continue
        expect(shown).to_have_attribute("data-significant", str(row["significant"]).lower())
        expect(cells.nth(6)).to_have_text("significant" if row["significant"] else "within noise")
    # Every sample right in one run and wrong in the other: both standard errors are 0, and no call is made.
    pick = side.locator('tr[data-task="pick"][data-metric="acc"]')
    expect(pick.locator("td").nth(6)).to_have_text("—")
    expect(pick.locator("td.difference")).to_have_text("-1.0000")
    expect(side.locator('tr[data-task="arith"][data-metric="acc"]')).to_have_attribute("data-significant", "false")
    expect(side.locator('tr[data-task="arith"][data-metric="acc"] td.difference')).to_have_text("0.0000")
    shot(page, "eval-compared")

    # A run that is no eval is refused by the API, and the page says why.
    page.fill("#compare-input", echo)
    page.click("#compare-form button[type=submit]")
    expect(page.locator("#eval-compare-error")).to_contain_text("has taskType 'echo', not eval")
