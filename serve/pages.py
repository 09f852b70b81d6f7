"""The gateway's web pages: `/` (side by side, the front page), `/chat`, `/leaderboard` and
`/ops` (operator console), plain HTML/CSS/JS from `serve/static/` with no build step.

A page is `layout.html` (head, navigation, the shared script) around the page's own `<main>`
fragment and script, put together once per process. Every page is sent with a
Content-Security-Policy that allows only this origin's scripts, styles and connections and no
inline script: the operator's token lives in the same origin's session storage, and model
output is only ever inserted as text."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# URL -> (title, the page's <main> fragment, its script)
PAGES = {"/": ("side by side", "index.html", "arena.js"),
         "/chat": ("chat", "chat.html", "chat.js"),
         "/leaderboard": ("leaderboard", "leaderboard.html", "leaderboard.js"),
         "/ops": ("operator console", "ops.html", "ops.js")}
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                           "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
                "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@cache
def render(path: str) -> str:
    title, fragment, script = PAGES[path]
    layout = (STATIC_DIR / "layout.html").read_text(encoding="utf-8")
    return (layout.replace("{title}", title).replace("{script}", script)
            .replace("{main}", (STATIC_DIR / fragment).read_text(encoding="utf-8")))


def _page_route(path: str) -> None:
    async def page() -> HTMLResponse:
        return HTMLResponse(render(path), headers=PAGE_HEADERS)

    page.__name__ = f"page_{PAGES[path][2].removesuffix('.js')}"
    router.add_api_route(path, page, methods=["GET"])


for _path in PAGES:
    _page_route(_path)


def install(app: FastAPI) -> None:
    """The page routes, and the pages' scripts and stylesheet under /static/."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
