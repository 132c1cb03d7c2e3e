"""GET /dashboard: a web page for following tasks, workers and usage, served by the orchestrator.

The page and its assets hold no data and need no token; the page's script calls the JSON API with
the bearer token the user enters, so it sees exactly what that token may see. Plain files from the
package's api/static folder: no build step, nothing fetched from outside.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from mloc.errors import NotFound

router = APIRouter(tags=["dashboard"])

STATIC = Path(__file__).parent / "static"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
}

# The page builds its DOM from script files only (no inline script or style), and only talks to
# this origin, so a strict policy costs nothing and blunts any injection that slipped past escaping.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate on each load so an upgraded orchestrator serves its own script, never a stale one.
    "Cache-Control": "no-cache",
}


def _file(name: str, request: Request) -> Response:
    path = STATIC / name
    if not _NAME.match(name) or path.suffix not in _TYPES or not path.is_file():
        raise NotFound(f"no dashboard file {name[:100]!r}")
    response = FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS, stat_result=path.stat())
    # The page revalidates on every load (no-cache): a file it already holds is answered 304, no body.
    etag = response.headers.get("etag")
    asked = {tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")}
    if etag and (etag in asked or "*" in asked):
        return Response(status_code=304, headers={**_HEADERS, "ETag": etag})
    return response


@router.get("/dashboard", include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The dashboard page."""
    return _file("index.html", request)


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def dashboard_file(name: str, request: Request) -> Response:
    """A script, style sheet or icon of the dashboard (files directly in api/static; no subfolders)."""
    return _file(name, request)
