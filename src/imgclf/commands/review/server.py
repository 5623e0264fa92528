"""The review page over HTTP (FastAPI + uvicorn, as `imgclf serve`): one HTML file and a JSON API.

    GET  /                     the page (page.html: plain HTML and JS, nothing fetched elsewhere)
    GET  /api/state            queues, items, decisions, counts (ReviewSession.state)
    POST /api/decision         {"path", "action", "labels"}: recorded and saved at once
    POST /api/undo             takes back the last decision
    GET  /api/image?path=P     the image file, for paths the review's tables name (404 otherwise)
    GET  /api/heatmap?path=P&label=C   Grad-CAM overlay PNG of class C (default: predicted)

Every handler calls a `ReviewSession` method, the same ones a script uses. Errors are
{"error": "..."} with a 4xx status. Images are looked up by the exact path string in the
session's tables, so no request can reach a file by a path it makes up (../, absolute paths).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import socket
from importlib import resources
from pathlib import Path

from imgclf.commands.review.session import ReviewSession
from imgclf.data.images import open_rgb
from imgclf.errors import ImageError, ImgclfError

log = logging.getLogger(__name__)

try:
    # At module level: FastAPI resolves the handlers' annotations in this module's namespace.
    from fastapi import Request
except ImportError:  # the `serve` extra is not installed; create_app says so
    Request = None  # type: ignore[assignment,misc]

# Formats every browser shows as they are; others are converted to PNG when served.
_BROWSER_TYPES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}


def page_html() -> str:
    """The page, from the package data."""
    return resources.files("imgclf.commands.review").joinpath("page.html").read_text("utf-8")


def create_app(session: ReviewSession):
    """The FastAPI application of a review session."""
    if Request is None:
        raise ImgclfError("the review page needs FastAPI and uvicorn: pip install 'imgclf[serve]'")
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title=f"imgclf review: {session.folder.name}", docs_url=None, redoc_url=None)
    page = page_html()

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ImgclfError)
    async def _user_error(request: Request, exc: ImgclfError):
        return error(400, str(exc))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/api/state")
    async def state():
        return JSONResponse(session.state(), headers={"Cache-Control": "no-store"})

    @app.post("/api/decision")
    async def decision(request: Request):
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            return error(400, "send the decision as JSON: {\"path\", \"action\", \"labels\"}")
        if not isinstance(body, dict) or not isinstance(body.get("path"), str) \
                or not isinstance(body.get("action"), str):
            return error(400, "a decision needs \"path\" and \"action\" (keep, relabel, exclude, "
                              "negative)")
        labels = body.get("labels") or []
        if not isinstance(labels, list):
            return error(400, "\"labels\" is a list of class names")
        if body["path"] not in session.items:
            return error(404, "not an image of this review")
        d = await run_in_threadpool(session.decide, body["path"], body["action"], labels)
        return {"path": body["path"], "decision": d, "counts": session.counts()}

    @app.post("/api/undo")
    async def undo():
        out = await run_in_threadpool(session.undo)
        return {**out, "counts": session.counts()}

    @app.get("/api/image")
    async def image(path: str = ""):
        try:
            file = session.image_file(path)
        except KeyError:
            return error(404, "not an image of this review")
        if not file.is_file():
            return error(404, "the file is gone")
        if file.suffix.lower() in _BROWSER_TYPES:
            data = await run_in_threadpool(file.read_bytes)
            kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            return Response(data, media_type=kind, headers={"Cache-Control": "max-age=3600"})
        try:
            data = await run_in_threadpool(_as_png, file)
        except ImageError as e:
            return error(415, str(e))
        return Response(data, media_type="image/png")

    @app.get("/api/heatmap")
    async def heatmap(path: str = "", label: str | None = None):
        if path not in session.items:
            return error(404, "not an image of this review")
        try:
            png = await run_in_threadpool(session.heatmap_png, path, label)
        except ImageError as e:
            return error(415, str(e))
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return app


def _as_png(file: Path) -> bytes:
    import io

    buf = io.BytesIO()
    open_rgb(file).save(buf, format="PNG")
    return buf.getvalue()


def run_review(target: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the review page of a run or cross-validation folder until interrupted.

    Raises:
        ImgclfError: Not a run or cross-validation folder, or the port is taken.
    """
    import uvicorn

    session = ReviewSession(target)
    app = create_app(session)
    with socket.socket() as s:  # a clear message instead of uvicorn's traceback
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ImgclfError(f"cannot listen on {host}:{port} ({e.strerror}): pass another "
                              "--port") from None
    n = sum(len(v) for v in session.queues.values())
    log.info("Review of %s: %s (%d queue entries; decisions go to %s). Ctrl-C stops.",
             session.folder, f"http://{host}:{port}/", n, session.corrections_path)
    uvicorn.run(app, host=host, port=port, log_level="warning")
