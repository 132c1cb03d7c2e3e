"""Web search providers for the agent's ``web_search`` tool.

A worker chooses one with ``MLOC_WEB_SEARCH_PROVIDER``. Built in: ``searxng`` (a SearXNG instance's
JSON API at ``MLOC_SEARXNG_URL``), which suits a fleet that runs its own search endpoint. Others are
plug-ins: an entry point in the ``mloc.search_providers`` group names a callable that takes no
arguments and returns an object with ``search(query, k) -> list[SearchResult]``.
Any failure is a :class:`SearchError` whose message says what to configure or what was unreachable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

PROVIDER_ENV = "MLOC_WEB_SEARCH_PROVIDER"
SEARXNG_URL_ENV = "MLOC_SEARXNG_URL"
ENTRY_POINT_GROUP = "mloc.search_providers"


class SearchError(RuntimeError):
    """web_search cannot answer; the message is shown to the agent and in the trace."""


@dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class SearchProvider(Protocol):
    name: str

    def search(self, query: str, k: int) -> list[SearchResult]: ...


class SearxngProvider:
    """Queries a SearXNG instance (``/search?format=json``); the instance must allow the JSON format."""

    name = "searxng"

    def __init__(self, base_url: str, *, timeout_sec: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_sec = timeout_sec

    def search(self, query: str, k: int) -> list[SearchResult]:
        url = f"{self.base_url}/search?" + urllib.parse.urlencode({"q": query, "format": "json"})
        request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "mloc-agent"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_sec) as response:
                body = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise SearchError(f"web_search: {self.base_url} answered HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SearchError(
                f"web_search could not reach {self.base_url} ({reason}); this worker may have no network "
                f"access, or {SEARXNG_URL_ENV} is wrong"
            ) from exc
        except ValueError as exc:
            raise SearchError(f"web_search: {self.base_url} did not answer with JSON ({exc})") from exc
        results = body.get("results", []) if isinstance(body, dict) else []
        return [
            SearchResult(str(item.get("title", "")), str(item.get("url", "")), str(item.get("content", "")))
            for item in results[:k]
            if isinstance(item, dict)
        ]


def configured_provider() -> SearchProvider:
    """The provider the worker is configured with; raises :class:`SearchError` when there is none."""
    from mloc.settings import Settings

    settings = Settings()
    name = settings.web_search_provider.strip()
    if not name:
        raise SearchError(
            f"web_search has no search provider on this worker: set {PROVIDER_ENV} (for example 'searxng' "
            f"with {SEARXNG_URL_ENV}), or install a plug-in in the '{ENTRY_POINT_GROUP}' entry-point group"
        )
    if name == "searxng":
        url = settings.searxng_url.strip()
        if not url.startswith(("http://", "https://")):
            raise SearchError(f"web_search provider 'searxng' needs {SEARXNG_URL_ENV}=http(s)://host[:port]")
        return SearxngProvider(url)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            provider: SearchProvider = entry.load()()
            return provider
    raise SearchError(
        f"web_search provider {name!r} ({PROVIDER_ENV}) is not installed; use 'searxng' or install a "
        f"plug-in in the '{ENTRY_POINT_GROUP}' entry-point group"
    )


def format_results(results: list[SearchResult]) -> str:
    if not results:
        return "no results"
    return "\n".join(f"{n}. {r.title} ({r.url})\n   {r.snippet}" for n, r in enumerate(results, start=1))
