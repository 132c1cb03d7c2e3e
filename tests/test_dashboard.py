"""The web dashboard end to end: a real cluster, the page in headless Chromium driven by Playwright.

Needs /usr/bin/chromium and the playwright package (scripts/install_browser.sh installs both).
Screenshots are kept in test-artifacts/dashboard/ for a person to look at.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

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


def write_log_lines(redis_url: str, task_id: str, lines: list[str]) -> None:
    """Append lines to a task's log through the worker's own Reporter, as an executor's output would be.

    Used for a line with markup in it, which the echo executor never writes. Run in a thread:
    Playwright's sync API owns this thread's event loop."""

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            reporter = Reporter(client, task_id, time.time())
            for line in lines:
                reporter.handle({"ev": "log", "level": "INFO", "message": line, "ts": time.time()})
            await reporter.close()
        finally:
            await client.aclose()

    thread = threading.Thread(target=asyncio.run, args=(write(),))
    thread.start()
    thread.join(10)


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
    page.click("#task-filters button[type=submit]")
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
    for bad in ("/dashboard/static/..%2F..%2Fapp.py", "/dashboard/static/.hidden.js", "/dashboard/static/missing.js"):
        response = httpx.get(cluster.api_url + bad, timeout=10)
        assert response.status_code == 404, bad
