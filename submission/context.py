"""The Docker build context: wheelhouse (runtime deps + a lapsam wheel), model, predict.sh.

The image is built offline: nothing inside ``docker build`` reaches a package index. The
host downloads manylinux wheels for the image's Python (``pip download --only-binary=:all:
--python-version 3.11 --platform manylinux...``) into a cached wheelhouse, builds a wheel of
lapsam from the source tree (no extras: the runtime needs numpy, onnxruntime, openvino,
threadpoolctl and tqdm only), and lays out a context folder that the repo's ``Dockerfile`` expects::

    Dockerfile
    wheelhouse/deps/*.whl + requirements.txt   (changes rarely: an early, cached layer;
                                                requirements.txt names only the engine(s)
                                                whose files the model ships)
    wheelhouse/lapsam/lapsam-*.whl            (changes with the code)
    model/                                      (the exported model folder: the last layers)
    predict.sh
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from lapsam.errors import LapsamError
from lapsam.manifest import BACKENDS, MANIFEST_NAME, ModelManifest

log = logging.getLogger(__name__)

#: What the torch-free runtime needs (pyproject's base dependencies).
RUNTIME_PACKAGES: tuple[str, ...] = ("numpy", "onnxruntime", "openvino", "threadpoolctl", "tqdm")
#: The engine package each backend of the manifest needs: the image installs only the engines
#: whose files its model ships (an OpenVINO-only model gets no onnxruntime).
ENGINE_PACKAGES: dict[str, str] = {"openvino": "openvino", "onnx": "onnxruntime"}
#: glibc tags accepted by a Debian bookworm (glibc 2.36) or newer image; pip 23 does not
#: expand a single manylinux tag to the older ones, so all are listed.
MANYLINUX_PLATFORMS: tuple[str, ...] = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_36_x86_64",
)
DEFAULT_CACHE = Path(os.environ.get("LAPSAM_CACHE_DIR", Path.home() / ".cache" / "lapsam"))


class SubmissionError(LapsamError):
    """Building, saving or verifying the submission image failed."""


@dataclass
class WheelhouseSpec:
    """Which wheels the image gets: pinned requirements for one Python version and platform set."""

    requirements: list[str]
    python_version: str = "3.11"
    platforms: tuple[str, ...] = MANYLINUX_PLATFORMS
    extra_pip_args: list[str] = field(default_factory=list)

    def key(self) -> str:
        text = "\n".join([self.python_version, *self.platforms, *sorted(self.requirements)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def pinned_runtime_requirements() -> list[str]:
    """The runtime packages pinned to the versions installed here (what the tests ran with)."""
    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def requirement_name(req: str) -> str:
    """``numpy`` for ``numpy==2.4.6`` (also ``>=``, ``<``, extras, markers)."""
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower()


def image_requirements(backends: set[str] | frozenset[str] | tuple[str, ...], requirements: list[str]) -> list[str]:
    """``requirements`` without the engines of the other backends: what an image whose model ships
    ``backends`` (manifest words: ``openvino``, ``onnx``) installs."""
    unknown = set(backends) - set(ENGINE_PACKAGES)
    if unknown or not backends:
        raise SubmissionError(f"the model ships backend(s) {sorted(backends)}; the image needs one of "
                              f"{sorted(ENGINE_PACKAGES)}")
    drop = {pkg for b, pkg in ENGINE_PACKAGES.items() if b not in backends}
    return [r for r in requirements if requirement_name(r) not in drop]


def model_backends(model: Path) -> set[str]:
    """The backends (manifest words) of the files an exported model folder ships."""
    try:
        manifest = ModelManifest.load(model)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise SubmissionError(f"{model}: {exc}") from None
    return {f.backend for f in manifest.files}


def predict_backend(backends: set[str]) -> str:
    """The engine ``predict.sh`` runs for a model shipping ``backends``: OpenVINO when it has IR files."""
    return "openvino" if "openvino" in backends else "onnxruntime"


def find_repo_root(start: Path | None = None) -> Path:
    """The lapsam source tree (holding pyproject.toml and the Dockerfile)."""
    here = Path(start) if start else Path(__file__).resolve().parent
    for d in [here, *here.parents]:
        if (d / "pyproject.toml").is_file() and (d / "Dockerfile").is_file():
            return d
    raise SubmissionError(
        "cannot find the lapsam source tree (pyproject.toml + Dockerfile); pass --repo DIR"
    )


def _run(cmd: list[str], what: str) -> None:
    log.debug("running: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SubmissionError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def prepare_wheelhouse(spec: WheelhouseSpec, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download the runtime wheels once per spec into ``cache_dir/wheelhouse/<key>``; return it.

    A folder is only used when complete (a marker file is written last).
    """
    dest = Path(cache_dir) / "wheelhouse" / spec.key()
    marker = dest / ".complete"
    if marker.is_file():
        log.info("wheelhouse cached: %s", dest)
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
        "--only-binary=:all:", "--python-version", spec.python_version,
        "--implementation", "cp", "--abi", "cp" + spec.python_version.replace(".", ""),
    ]
    for p in spec.platforms:
        cmd += ["--platform", p]
    cmd += ["-d", str(tmp), *spec.extra_pip_args, *spec.requirements]
    log.info("downloading runtime wheels for Python %s: %s", spec.python_version, " ".join(spec.requirements))
    _run(cmd, "pip download of the runtime wheels")
    (tmp / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def build_lapsam_wheel(repo: Path, dest: Path) -> Path:
    """Build a wheel of lapsam (no extras, no dependencies bundled) from the source tree."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("lapsam-*.whl"):
        old.unlink()
    cmd = [
        sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--no-deps",
        "--no-build-isolation", "-w", str(dest), str(repo),
    ]
    log.info("building the lapsam wheel from %s", repo)
    _run(cmd, "building the lapsam wheel")
    wheels = sorted(dest.glob("lapsam-*.whl"))
    if not wheels:
        raise SubmissionError(f"pip wheel produced no lapsam wheel in {dest}")
    return wheels[-1]


def check_model_dir(model: Path) -> None:
    if not (Path(model) / MANIFEST_NAME).is_file():
        raise SubmissionError(f"{model}: not an exported model folder (no {MANIFEST_NAME})")


def copy_model(model: Path, dst: Path, backends: tuple[str, ...] | None = None) -> Path:
    """Copy an exported model folder; with ``backends``, only those backends' files and manifest entries.

    Keeping one backend (e.g. only ``openvino``, what ``predict.sh`` runs) makes the image smaller;
    the runtime then refuses the other backend with a clear error.
    """
    model, dst = Path(model), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    if not backends:
        shutil.copytree(model, dst)
        return dst
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SubmissionError(f"unknown backend(s) {sorted(unknown)}; choose from {list(BACKENDS)}")
    manifest = ModelManifest.load(model)
    keep = [f for f in manifest.files if f.backend in backends]
    if not {f.role for f in keep} >= {"encoder", "decoder"}:
        raise SubmissionError(f"{model}: the manifest has no encoder and decoder for backend(s) {list(backends)}")
    referenced = {name for f in manifest.files for name in (f.path, *f.files)}
    wanted = {name for f in keep for name in (f.path, *f.files)}
    for src in sorted(p for p in model.rglob("*") if p.is_file()):
        rel = src.relative_to(model).as_posix()
        if rel == MANIFEST_NAME or (rel in referenced and rel not in wanted):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    manifest.files = keep
    manifest.notes = [*manifest.notes, f"submission image: kept backend(s) {', '.join(backends)} only"]
    manifest.save(dst)
    return dst


def prepare_context(
    model: Path,
    out: Path,
    repo: Path | None = None,
    spec: WheelhouseSpec | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    backends: tuple[str, ...] | None = None,
) -> Path:
    """Lay out a complete build context in ``out`` (created or refreshed) and return it."""
    model = Path(model)
    check_model_dir(model)
    repo = find_repo_root(repo)
    spec = spec or WheelhouseSpec(pinned_runtime_requirements())
    wheels = prepare_wheelhouse(spec, cache_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / "Dockerfile", out / "Dockerfile")
    if (repo / ".dockerignore").is_file():
        shutil.copy2(repo / ".dockerignore", out / ".dockerignore")
    copy_model(model, out / "model", backends)
    # Only the engine(s) the copied model ships are installed (requirements.txt); pip picks
    # those from the wheelhouse, which holds every runtime wheel.
    reqs = image_requirements(model_backends(out / "model"), spec.requirements)
    deps = out / "wheelhouse" / "deps"
    shutil.rmtree(deps, ignore_errors=True)
    deps.mkdir(parents=True)
    for f in wheels.iterdir():
        if f.suffix == ".whl":
            # Hard links when possible: the wheelhouse is about 100 MB.
            try:
                os.link(f, deps / f.name)
            except OSError:
                shutil.copy2(f, deps / f.name)
    (deps / "requirements.txt").write_text("\n".join(reqs) + "\n")
    build_lapsam_wheel(repo, out / "wheelhouse" / "lapsam")
    shutil.copy2(repo / "submission" / "predict.sh", out / "predict.sh")
    return out
