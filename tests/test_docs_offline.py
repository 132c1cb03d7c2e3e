"""The API documents' pages (/docs, /redoc) on a network with no way out: every script, style sheet and
icon they load comes from the orchestrator itself, not from a CDN."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from mloc.localcluster import LocalCluster

TOKEN = "docs-admin-token"
PAGES = ("/docs", "/redoc")
# What a page's HTML loads: <script src>, <link href>, and the OpenAPI document it is pointed at.
REFERENCE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
# Swagger UI's bundle is over a megabyte and ReDoc's near one; a stub or an error page is far smaller.
SMALLEST = {".js": 100_000, ".css": 10_000, ".png": 100, ".json": 1_000}
# ReDoc's "API docs by Redocly" logo, built into its script: the page drops the image when it does not load.
REDOC_ATTRIBUTION = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    return make_cluster(0, env={"ORCHESTRATOR_TOKEN": TOKEN})


def references(html: str) -> list[str]:
    return [first or second for first, second in REFERENCE.findall(html)]


def test_docs_pages_load_every_asset_from_the_orchestrator(cluster: LocalCluster) -> None:
    # No token: the pages and what they load hold no data, and were public before they were served here.
    with httpx.Client(base_url=cluster.api_url, timeout=10) as http:
        loaded: set[str] = set()
        for page in PAGES:
            answer = http.get(page)
            assert answer.status_code == 200, (page, answer.text[:200])
            assert answer.headers["content-type"].startswith("text/html")
            assert "http://" not in answer.text and "https://" not in answer.text, answer.text
            found = references(answer.text)
            assert any(url.endswith(".js") for url in found), (page, found)
            for url in found:
                assert urlsplit(url).netloc == "" and url.startswith("/"), (page, url)
            loaded |= set(found)
        assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/openapi.json"} <= loaded
        assert "/docs/static/redoc.standalone.js" in loaded

        for url in sorted(loaded):
            answer = http.get(url)
            suffix = "." + url.rsplit(".", 1)[-1]
            assert answer.status_code == 200, (url, answer.text[:200])
            assert TYPES[suffix] in answer.headers["content-type"], (url, answer.headers["content-type"])
            assert len(answer.content) >= SMALLEST[suffix], (url, len(answer.content))
            head = http.head(url)
            assert head.status_code == 200 and head.content == b"", url

        # A cache-busting query on an asset or a link's parameters on a page are not refused as unknown
        # query parameters: those are the API operations' check.
        assert http.get("/docs/static/swagger-ui.css", params={"v": "1"}).status_code == 200
        assert http.get("/docs", params={"from": "readme"}).status_code == 200

        redirect = http.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "https://" not in redirect.text

        missing = http.get("/docs/static/no-such-file.js")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"

        document = http.get("/openapi.json").json()
        assert not [path for path in document["paths"] if path.startswith(("/docs", "/redoc"))]


@pytest.mark.extra("browser")
def test_docs_pages_render_with_the_outside_unreachable(cluster: LocalCluster) -> None:
    from playwright.sync_api import Route, expect, sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    origin = cluster.api_url.rstrip("/")
    outside: list[str] = []
    problems: list[str] = []

    def only_here(route: Route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urljoin(url, "/").rstrip("/") == origin:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.route("**/*", only_here)
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

            page.goto(origin + "/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("MLOC orchestrator")
            expect(page.locator(".opblock-summary-path", has_text="/api/v1/tasks").first).to_be_visible()

            page.goto(origin + "/redoc")
            expect(page.locator("h1", has_text="MLOC orchestrator").first).to_be_visible()
            expect(page.get_by_text("/api/v1/tasks").first).to_be_attached()
        finally:
            browser.close()
    assert not [url for url in outside if url != REDOC_ATTRIBUTION], outside
    assert not problems, problems
