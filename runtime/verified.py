"""Model files whose sha256 the image build already checked, so a container need not hash them again.

``lapsam predict`` checks every model file against the sha256 in ``manifest.json`` before loading it
(:func:`lapsam.runtime.engines.check_files`). In the submission image every case runs in a fresh
container, so that check would hash the whole model at every start, for files that cannot have
changed since the build. The build checks them once and writes a marker
(``python -m lapsam.submission.warmup --marker FILE``, run by the Dockerfile:
:func:`write_marker`), and the runtime skips hashing a file only when (:func:`verified_at_build`):

* ``$LAPSAM_VERIFIED_MARKER`` names the marker. The image sets it (``ENV``); it is unset everywhere
  else, so ``lapsam predict --model DIR`` on a user's machine always hashes;
* the marker is for this model folder (its resolved path) and for the exact ``manifest.json`` it
  checked (the sha256 of its bytes);
* the marker recorded for that file the sha256 the manifest gives, and the file's size and
  modification time (whole seconds: ``docker save`` keeps no finer mtime) are unchanged.

Anything else (no marker, another model, a changed manifest or file, an unreadable marker) means
hashing as usual. The marker is written by root at build time in a folder the container's user
cannot write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lapsam.manifest import MANIFEST_NAME, ModelFile, ModelManifest, verify_file

MARKER_ENV = "LAPSAM_VERIFIED_MARKER"
MARKER_VERSION = 1


def _size_mtime(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, int(st.st_mtime)


def write_marker(model_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Check every file of the model against its sha256 (ModelIntegrityError if one differs) and
    record what was checked in ``out`` (JSON). Returns the record."""
    model_dir = Path(model_dir).resolve()
    manifest_bytes = (model_dir / MANIFEST_NAME).read_bytes()
    manifest = ModelManifest.from_dict(json.loads(manifest_bytes))
    files: dict[str, dict[str, Any]] = {}
    for entry in manifest.files:
        verify_file(model_dir, entry)
        for rel, digest in entry.files.items():
            size, mtime = _size_mtime(model_dir / rel)
            files[rel] = {"sha256": digest, "size": size, "mtime": mtime}
    record = {
        "version": MARKER_VERSION,
        "model_dir": str(model_dir),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "files": files,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    return record


def verified_at_build(model_dir: str | Path, entry: ModelFile, marker: str | Path | None = None) -> bool:
    """Whether every file of ``entry`` is covered by the build's marker (``marker``, else
    ``$LAPSAM_VERIFIED_MARKER``) and unchanged since; False whenever in doubt."""
    path = marker if marker is not None else os.environ.get(MARKER_ENV)
    if not path:
        return False
    try:
        record = json.loads(Path(path).read_text())
        model_dir = Path(model_dir).resolve()
        if record.get("version") != MARKER_VERSION or record.get("model_dir") != str(model_dir):
            return False
        manifest_sha = hashlib.sha256((model_dir / MANIFEST_NAME).read_bytes()).hexdigest()
        if manifest_sha != record.get("manifest_sha256") or not entry.files:
            return False
        for rel, digest in entry.files.items():
            rec = record["files"].get(rel)
            if not isinstance(rec, dict) or rec.get("sha256") != digest:
                return False
            if list(_size_mtime(model_dir / rel)) != [rec.get("size"), rec.get("mtime")]:
                return False
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return False
    return True
