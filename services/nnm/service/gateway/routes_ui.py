"""The dashboard: a static page and its script, served by the gateway itself under /ui/.

The files hold no user data (everything comes from the /v1 API with the user's key), so they are
served without authentication, with a strict Content-Security-Policy: scripts and styles only from
this origin, images from here or from data:/blob: URLs the script makes, no framing, no plugins.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate: a new release's script is picked up at once
}
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "app.css": "text/css; charset=utf-8"}


def _load() -> dict[str, bytes]:
    folder = resources.files(__package__) / "ui"
    return {name: (folder / name).read_bytes() for name in FILES}


_CONTENT = _load()


def _file(name: str) -> Response:
    return Response(_CONTENT[name], media_type=FILES[name], headers=SECURITY_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
@router.get("/ui/")
def index() -> Response:
    return _file("index.html")


@router.get("/ui/app.js")
def script() -> Response:
    return _file("app.js")


@router.get("/ui/app.css")
def style() -> Response:
    return _file("app.css")
