"""The demo's web server: a FastAPI app serving one static page and three JSON endpoints.

    POST /api/photo?name=F    body: the image file    -> every face: box, label, confidence, top-3
    POST /api/frame?stream=S  body: a JPEG camera frame -> tracked faces of that frame
    POST /api/video?name=F    body: the video file    -> `ferflow watch`'s summary + timeline PNG

Bodies are the raw file (no multipart form, so no extra parser to install), read in chunks
and refused past the limit before the rest arrives. Every refusal is a JSON {"error": ...}
with a 4xx status that the page shows; anything unexpected is a 500 with one line, never a
traceback page, and the server goes on answering.
"""

from __future__ import annotations

import logging
import socket
import threading
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

# FastAPI reads the endpoints' annotations at run time: Request must be a module global.
# Only `ferflow demo` imports this module, so `ferflow --help` does not pay for it.
from fastapi import FastAPI, Request

if TYPE_CHECKING:
    from ferflow.demo.analysis import Demo

STATIC = Path(__file__).parent / "static"
MAX_NAME_CHARS = 200  # a file name shown back on the page
log = logging.getLogger("ferflow.demo")


class TooLarge(Exception):
    """An upload over its limit (HTTP 413)."""


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, or TooLarge as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {int(declared):,} bytes, over the demo's limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"{what} is over the demo's limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _name(raw: str) -> str:
    return (raw or "upload").replace("\n", " ")[:MAX_NAME_CHARS]


def create_app(demo: Demo) -> FastAPI:
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from ferflow.demo.analysis import UploadError

    app = FastAPI(title="ferflow demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(UploadError)
    async def refused(_: Request, exc: UploadError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(TooLarge)
    async def too_large(_: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        log.error("demo request failed", exc_info=exc)  # the traceback stays in the server's log
        return JSONResponse(
            {"error": f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}, 500
        )

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def info() -> dict:
        return demo.info()

    @app.post("/api/photo")
    async def photo(request: Request, name: str = "photo") -> dict:
        data = await read_body(request, demo.limits.photo_bytes, _name(name))
        return await run_in_threadpool(demo.photo, _name(name), data)

    @app.post("/api/frame")
    async def frame(request: Request, stream: str = "default") -> dict:
        data = await read_body(request, demo.limits.photo_bytes, "camera frame")
        return await run_in_threadpool(demo.frame, stream[:64], data)

    @app.post("/api/video")
    async def video(request: Request, name: str = "video") -> dict:
        data = await read_body(request, demo.limits.video_bytes, _name(name))
        return await run_in_threadpool(demo.video, _name(name), data)

    return app


def check_port(host: str, port: int) -> None:
    """Fail with one line, before loading the model, when the address is taken."""
    from ferflow.serving.model import UsageError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another --port") from None


def serve(uri: str, host: str, port: int, max_video_bytes: int, open_page: bool) -> None:
    """Load the model, then serve the page until Ctrl-C."""
    import uvicorn

    from ferflow.demo.analysis import Demo

    check_port(host, port)
    demo = Demo(uri, max_video_bytes)
    print(demo.description, flush=True)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"ferflow demo: open {url} (Ctrl-C stops)", flush=True)
    if open_page:
        threading.Timer(1.0, webbrowser.open, (url,)).start()
    uvicorn.Server(uvicorn.Config(create_app(demo), host=host, port=port, log_level="warning")).run()
