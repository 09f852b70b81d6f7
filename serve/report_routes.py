"""GET /report and GET /report/{name}.png: the loop report that `arena report` builds
(learner/report.py) into `<data dir>/report/`. These routes only read files; building takes
seconds of matplotlib and never happens on a request."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from learner.report import INDEX, report_dir
from serve.deps import gateway_state
from serve.errors import APIError

router = APIRouter()
PLOT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
NO_REPORT = "no loop report has been built yet: run `arena report` on the server"


def _folder(request: Request) -> Path:
    return report_dir(gateway_state(request).settings)


# The report is static HTML with its own <style> and its PNGs: no script may run in it (the
# operator's token lives in this origin's session storage).
REPORT_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@router.get("/report", include_in_schema=False)
async def report_index(request: Request) -> FileResponse:
    index = _folder(request) / INDEX
    if not index.is_file():
        raise APIError(404, NO_REPORT, "no_report")
    return FileResponse(index, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache",
                                 "Content-Security-Policy": REPORT_CSP,
                                 "X-Content-Type-Options": "nosniff"})


@router.get("/report/{name}.png", include_in_schema=False)
async def report_plot(request: Request, name: str) -> FileResponse:
    if not PLOT_NAME.fullmatch(name):
        raise APIError(400, "invalid plot name: letters, digits, '-' and '_' only",
                       "invalid_name", "name")
    folder = _folder(request)
    path = folder / f"{name}.png"
    if not path.is_file() or path.resolve().parent != folder.resolve():
        message = NO_REPORT if not (folder / INDEX).is_file() else f"no plot {name}.png"
        raise APIError(404, message, "not_found")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})
