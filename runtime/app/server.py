"""The web app: a Starlette JSON API over a :class:`~.session.Session`, plus the static page.

Served by uvicorn on 127.0.0.1 by default (``lapsam app``). Requests whose ``Host`` is not this
machine's loopback name are refused unless another host was asked for (no DNS rebinding). Every
error is a JSON ``{"error": "one line"}`` with a 4xx status, shown in the page; the server keeps
running. Nothing is sent anywhere but to the page.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lapsam.errors import LapsamError

from .session import Busy, NoImage, Session
from .volume import MASK_FORMATS, ImageTooLarge

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MEDIA = {"nii.gz": "application/gzip", "nii": "application/octet-stream", "npz": "application/zip",
         "png": "image/png"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    max_upload_mb: float = 4096.0  # one upload (all files of a DICOM folder together)


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise LapsamError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise LapsamError("the request body must be a JSON object")
    return body


def _int(body: dict[str, Any], key: str, default: Any = ...) -> Any:
    v = body.get(key, default)
    if v is ...:
        raise LapsamError(f"missing '{key}'")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise LapsamError(f"'{key}' must be an integer") from None


def _float(body: dict[str, Any], key: str) -> float:
    try:
        v = float(body[key])
    except (KeyError, TypeError, ValueError):
        raise LapsamError(f"'{key}' must be a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise LapsamError(f"'{key}' must be a finite number")
    return v


def create_app(session: Session, config: ServerConfig | None = None) -> Starlette:
    """The Starlette application serving ``session``."""
    cfg = config or ServerConfig()
    max_upload = int(cfg.max_upload_mb * 2**20)
    session.max_upload_mb = cfg.max_upload_mb

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def state(request: Request) -> Response:
        return JSONResponse(session.state())

    async def open_upload(request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_upload:
            async for _ in request.stream():  # read it (and drop it) so the client gets the answer
                pass
            raise ImageTooLarge(f"upload of {int(size) / 2**20:,.0f} MiB is over the limit of "
                                f"{cfg.max_upload_mb:,.0f} MiB (lapsam app --max-upload-mb)")
        tmp = Path(tempfile.mkdtemp(prefix="lapsam-app-"))
        try:
            async with request.form(max_files=100_000, max_fields=100) as form:
                files = [f for f in form.getlist("files") if hasattr(f, "filename") and f.filename]
                if not files:
                    raise LapsamError("no file received")
                total = 0
                names: list[PurePosixPath] = []
                for i, f in enumerate(files):
                    rel = PurePosixPath(str(f.filename).replace("\\", "/"))
                    names.append(rel)
                    base = rel.name or f"file{i}"
                    dst = tmp / (base if len(files) == 1 else f"{i:06d}_{base}")
                    with dst.open("wb") as out:
                        while chunk := await f.read(1 << 20):
                            total += len(chunk)
                            if total > max_upload:
                                raise ImageTooLarge(f"upload is over the limit of {cfg.max_upload_mb:,.0f} MiB "
                                                    "(lapsam app --max-upload-mb)")
                            out.write(chunk)
            if len(files) == 1:
                target, name = tmp / (names[0].name or "file0"), None
            else:  # a DICOM folder: its name is the files' top folder
                target = tmp
                tops = {n.parts[0] for n in names if len(n.parts) > 1}
                name = tops.pop() if len(tops) == 1 else "DICOM series"
            from starlette.concurrency import run_in_threadpool

            out = await run_in_threadpool(session.open_path, target, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        session.adopt_upload_dir(tmp)
        return JSONResponse(out)

    async def open_path(request: Request) -> Response:
        body = await _json(request)
        path = str(body.get("path") or "").strip()
        if not path:
            raise LapsamError("give a file or folder path")
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(session.open_path, Path(path).expanduser(), None))

    async def post(request: Request) -> Response:
        """The small JSON actions (run in the thread pool: they may call the model)."""
        from starlette.concurrency import run_in_threadpool

        action = request.path_params["action"]
        body = await _json(request) if request.headers.get("content-length", "0") not in ("", "0") else {}

        def run() -> dict[str, Any]:
            if action == "window":
                session.set_window(str(body.get("name", "")))
            elif action == "object":
                return {"label": session.new_object()}
            elif action == "select":
                session.select(_int(body, "label"))
            elif action == "prepare":
                return {"encoded": session.prepare(_int(body, "z"))}
            elif action == "box":
                box = body.get("box")
                if not isinstance(box, list):
                    raise LapsamError("'box' must be [x0, y0, x1, y1]")
                return session.add_box(_int(body, "z", 0), box, _int(body, "label", None))
            elif action == "click":
                out = session.add_click(_int(body, "z", 0), _float(body, "x"), _float(body, "y"),
                                        bool(body.get("positive", True)), _int(body, "label", None))
                return out if isinstance(out, dict) else {}
            elif action == "mark":
                session.set_mark(str(body.get("which", "")), _int(body, "z", None), _int(body, "label", None))
            elif action == "propagate":
                labels = body.get("labels")
                session.propagate(None if labels is None else [int(v) for v in labels])
            elif action == "cancel":
                session.cancel()
            elif action == "file-boxes":
                session.run_file_boxes()
            elif action == "undo":
                return {"undone": session.undo()}
            elif action == "clear":
                session.clear()
            else:
                raise HTTPException(404, f"no action {action!r}")
            return {}

        out = await run_in_threadpool(run)
        return JSONResponse({**out, "state": session.state()})

    def slice_png(request: Request) -> Response:
        return Response(session.slice_png(int(request.path_params["z"])), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    def mask_png(request: Request) -> Response:
        return Response(session.mask_png(int(request.path_params["z"])), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    def save(request: Request) -> Response:
        fmt = request.query_params.get("format", "nii.gz")
        if fmt not in MASK_FORMATS:
            raise LapsamError(f"format must be one of {', '.join(MASK_FORMATS)}")
        z = request.query_params.get("z")
        data, name = session.save(fmt, int(z) if z not in (None, "") else None)
        return Response(data, media_type=MEDIA[fmt],
                        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    def on_lapsam(request: Request, exc: Exception) -> Response:
        status = 409 if isinstance(exc, (Busy, NoImage)) else 413 if isinstance(exc, ImageTooLarge) else 400
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(status, str(exc))

    def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    def on_other(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        if isinstance(exc, MemoryError):
            return _error(413, "out of memory: the image is too large for this machine")
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _error(500, f"internal error: {type(exc).__name__}: {first}".rstrip(": "))

    routes = [
        Route("/", index),
        Route("/api/state", state),
        Route("/api/open", open_upload, methods=["POST"]),
        Route("/api/open-path", open_path, methods=["POST"]),
        Route("/api/slice/{z:int}.png", slice_png),
        Route("/api/mask/{z:int}.png", mask_png),
        Route("/api/save", save),
        Route("/api/{action:str}", post, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    hosts = ["*"] if cfg.host not in ("127.0.0.1", "localhost", "::1") else ["127.0.0.1", "localhost", "[::1]"]
    return Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        exception_handlers={LapsamError: on_lapsam, HTTPException: on_http, Exception: on_other},
    )
