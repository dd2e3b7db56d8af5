"""HTTP routes of the operator dashboard: two HTML pages and their static assets.

The pages carry no job data, so they need no token: their scripts read the REST
API (``/api/v1``) with the bearer token the operator types into the page, which
is kept in the tab's ``sessionStorage`` only. Assets are served from a fixed
list of files in ``static/`` (no path from the request ever reaches the file
system), so nothing else in the package can be read through ``/static``.
"""

from __future__ import annotations

import html
import re
from functools import cache
from pathlib import Path
from string import Template

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse, HTMLResponse

from fedpilot import __version__

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"

UUID_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE
)

MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

STATIC_FILES: dict[str, Path] = {
    p.name: p
    for p in (sorted(STATIC_DIR.iterdir()) if STATIC_DIR.is_dir() else [])
    if p.is_file() and p.suffix in MEDIA_TYPES and not p.name.startswith(".")
}
"""The only files ``/static/{name}`` serves, by exact name."""

# Everything the pages load comes from this origin; scripts only from files.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@cache
def _template(name: str) -> Template:
    return Template((TEMPLATE_DIR / name).read_text(encoding="utf-8"))


def render(page: str, *, title: str, scripts: tuple[str, ...] = (), **values: str) -> str:
    """``page`` inside the shared layout, loading ``scripts`` from ``static/``.

    Every value is HTML-escaped."""
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    version = html.escape(__version__, quote=True)
    body = _template(page).substitute(escaped, version=version)
    tags = "\n".join(
        f'<script src="/static/{html.escape(s, quote=True)}?v={version}" defer></script>'
        for s in ("common.js", *scripts)
    )
    return _template("layout.html").substitute(
        title=html.escape(title),
        page=html.escape(page.removesuffix(".html")),
        version=version,
        scripts=tags,
        body=body,
    )


def _page(content: str, code: int = status.HTTP_200_OK) -> HTMLResponse:
    return HTMLResponse(content, status_code=code, headers=SECURITY_HEADERS)


@router.get("/", response_class=HTMLResponse)
def jobs_page() -> HTMLResponse:
    """Every job with its state, round and last accuracy; the connected workers."""
    return _page(render("jobs.html", title="Jobs · fedpilot", scripts=("jobs.js",)))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:
    """One job, live: rounds, curves, assignment heatmap, memory, stragglers, bytes."""
    if not UUID_RE.match(job_id):
        body = render("notfound.html", title="Not found · fedpilot", what=job_id)
        return _page(body, status.HTTP_404_NOT_FOUND)
    job_id = job_id.lower()
    return _page(
        render(
            "job.html",
            title=f"Job {job_id[:8]} · fedpilot",
            scripts=("charts.js", "job.js"),
            job_id=job_id,
        )
    )


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    path = STATIC_FILES.get(name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such asset")
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[path.suffix],
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
