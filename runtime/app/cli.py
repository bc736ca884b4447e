"""``lapsam app``: serve the segmentation page on this machine and open it in the browser.

Light module: the web stack (starlette, uvicorn) and the image readers are imported inside the
command; they come with ``pip install 'lapsam[app]'``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
import webbrowser
from pathlib import Path

from lapsam.errors import LapsamError, UsageError

from ..cli import MODEL_ENV, add_engine_args, default_model_dir

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app",
        help="a local web page to segment an image with boxes and clicks (CPU, nothing leaves the machine)",
        description="Serve a page on this machine (127.0.0.1 unless --host) to open an image "
        "(challenge .npz, NIfTI, DICOM series folder, PNG/JPG; by PATH, the page's file picker or "
        "drag-and-drop), draw boxes on slices and see each mask at once (every slice's embedding is "
        "computed once and kept), refine with foreground/background clicks, propagate 3D objects "
        "through the volume, undo, and save the mask "
        "as NIfTI (with the input's geometry), challenge npz or PNG. Needs the [app] extra.",
    )
    p.add_argument("path", nargs="?", type=Path, default=None,
                   help="image to open at start: .npz, .nii/.nii.gz, DICOM folder or .dcm, .png/.jpg")
    p.add_argument("--model", type=Path, default=None,
                   help=f"exported model folder with manifest.json (default: ${MODEL_ENV}, else models/default)")
    add_engine_args(p)
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    p.add_argument("--cache-mb", type=float, default=1024.0,
                   help="memory for kept slice embeddings (default 1024 MiB; 4 MiB per slice at 512 input)")
    p.add_argument("--max-upload-mb", type=float, default=4096.0,
                   help="largest upload the page accepts (default 4096 MiB)")
    p.add_argument("--max-image-mb", type=float, default=None,
                   help="largest image to open, values + masks (default: 80%% of the free memory)")
    p.set_defaults(func=cmd_app)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (port taken, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.listen(128)
    return sock


def cmd_app(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import ServerConfig, create_app
    except ImportError as exc:
        raise LapsamError(f"lapsam app needs the [app] extra (pip install 'lapsam[app]'): {exc}") from None
    from .segmenter import Segmenter, SegmenterConfig
    from .session import Session, SessionConfig

    model = args.model or default_model_dir()
    sock = bind(args.host, args.port)
    try:
        t = time.perf_counter()
        seg = Segmenter.from_model_dir(model, backend=args.backend, threads=args.threads, precision=args.precision,
                                       cache_dir=args.cache_dir, precision_hint=args.precision_hint,
                                       config=SegmenterConfig(cache_mb=args.cache_mb))
        log.info("model %s loaded in %.2f s", seg.model_name, time.perf_counter() - t)
        max_image = None if args.max_image_mb is None else int(args.max_image_mb * 2**20)
        session = Session(seg, SessionConfig(max_image_bytes=max_image))
        if args.path is not None:
            try:
                session.open_path(args.path)
            except LapsamError as exc:  # the page shows it; the server still starts
                log.error("%s", exc)
                session.message = str(exc)
        app = create_app(session, ServerConfig(host=args.host, max_upload_mb=args.max_upload_mb))
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{shown}:{port}/"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))

        def announce() -> None:
            while not server.started and not server.should_exit:
                time.sleep(0.05)
            if server.started:
                print(f"lapsam app: {url}  (Ctrl+C to stop)", flush=True)
                if not args.no_browser:
                    webbrowser.open(url)

        threading.Thread(target=announce, daemon=True).start()
        server.run(sockets=[sock])
    finally:
        sock.close()
        if "session" in locals():
            session.close()
    return 0
