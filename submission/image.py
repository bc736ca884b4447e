"""Build, save and load the submission image through the Docker SDK (the ``docker`` package)."""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lapsam.writers import atomic_write

from .context import SubmissionError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
log = logging.getLogger(__name__)

OFFLINE_BASE = "lapsam-base:bookworm"
DEFAULT_BASE = "python:3.11-slim"


def docker_client() -> Any:
    """A Docker SDK client, or a one-line error saying that no engine answers."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - the submit extra is missing
        raise SubmissionError("the docker package is missing: pip install 'lapsam[submit]'") from exc
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means "no engine"
        raise SubmissionError(
            f"no Docker engine answers ({type(exc).__name__}: {exc}); start dockerd "
            "(CI: .ci/docker.sh start) or set DOCKER_HOST"
        ) from exc
    return client


def image_exists(client: Any, ref: str) -> bool:
    import docker.errors

    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_base_image(base_image: str, client: Any = None) -> None:
    """The base image is here, or is pulled; otherwise a one-line error naming the offline way."""
    client = client or docker_client()
    if image_exists(client, base_image):
        return
    import docker.errors

    try:
        log.info("pulling base image %s", base_image)
        client.images.pull(base_image)
    except docker.errors.APIError as exc:
        raise SubmissionError(
            f"base image {base_image} is not here and cannot be pulled ({exc.explanation or exc}); "
            f"build the offline base with submission/make-base-image.sh and pass --base-image {OFFLINE_BASE}"
        ) from exc


@dataclass
class BuildResult:
    tag: str
    image_id: str
    size_bytes: int


def build_image(
    context: Path,
    tag: str,
    base_image: str = DEFAULT_BASE,
    build_args: dict[str, str] | None = None,
    on_log: Callable[[str], None] | None = None,
    client: Any = None,
) -> BuildResult:
    """``docker build -t tag context`` with ``BASE_IMAGE=base_image``, streaming the build log.

    The base image must be present locally or pullable; an error names both ways to get one.
    """
    client = client or docker_client()
    ensure_base_image(base_image, client)
    args = {"BASE_IMAGE": base_image, **(build_args or {})}
    emit = on_log or (lambda line: log.info("%s", line))
    image_id = None
    last_lines: list[str] = []
    for chunk in client.api.build(path=str(context), tag=tag, buildargs=args, rm=True, forcerm=True,
                                  decode=True, pull=False):
        if "stream" in chunk:
            for line in _ANSI.sub("", chunk["stream"]).splitlines():
                if line.strip():
                    emit(line)
                    last_lines = (last_lines + [line])[-20:]
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            detail = "\n".join(last_lines[-10:])
            raise SubmissionError(f"docker build of {tag} failed: {chunk['error'].strip()}\n{detail}")
    image = client.images.get(tag)
    return BuildResult(tag=tag, image_id=image_id or image.id, size_bytes=int(image.attrs["Size"]))


def image_size(tag: str, client: Any = None) -> int:
    client = client or docker_client()
    return int(client.images.get(tag).attrs["Size"])


def save_image(tag: str, out: Path, client: Any = None, compresslevel: int = 6) -> Path:
    """``docker save tag | gzip -c > out``, written atomically (a temporary file, then renamed)."""
    import docker.errors

    client = client or docker_client()
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound as exc:
        raise SubmissionError(f"no image {tag}; build it first with lapsam submission build") from exc
    out = Path(out)
    with atomic_write(out) as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                 compresslevel=compresslevel, mtime=0) as gz:
        # named=True keeps the tag in the archive, so `docker load` restores NAME:latest.
        for chunk in image.save(named=True, chunk_size=1 << 20):
            gz.write(chunk)
    return out


def load_image(tar: Path, client: Any = None) -> list[str]:
    """``docker load < tar`` (gzip or plain); returns the tags it restored."""
    client = client or docker_client()
    tar = Path(tar)
    if not tar.is_file():
        raise SubmissionError(f"{tar}: no such file")
    import docker.errors

    try:
        with open(tar, "rb") as fp:
            images = client.images.load(fp)
    except (docker.errors.APIError, docker.errors.ImageLoadError) as exc:
        detail = getattr(exc, "explanation", None) or exc
        raise SubmissionError(f"{tar}: docker load failed ({detail})") from exc
    tags = [t for img in images for t in img.tags]
    if not tags:
        raise SubmissionError(f"{tar}: docker load restored no tagged image")
    return tags


def human_size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def remove_image(tag: str, client: Any = None) -> None:
    import docker.errors

    client = client or docker_client()
    try:
        client.images.remove(tag, force=True)
    except docker.errors.ImageNotFound:
        pass


__all__ = [
    "BuildResult", "DEFAULT_BASE", "ensure_base_image", "OFFLINE_BASE", "build_image", "docker_client", "human_size",
    "image_exists", "image_size", "load_image", "remove_image", "save_image",
]
