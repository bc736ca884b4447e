"""Load ``.npz`` files without running arbitrary pickles.

Plain arrays are read with ``allow_pickle=False``. Object arrays (the CVPR 2025 keys
``boxes``, ``clicks``, ``clicks_order`` are Python objects saved by ``np.savez``) are
unpickled by :class:`RestrictedUnpickler`, which only admits the globals numpy needs
to rebuild arrays, dtypes and scalars. Dicts, lists, tuples, str, int, float, bool and
None need no globals at all. Anything else (``os.system``, ``builtins.eval``, ...) is
refused before it can be called.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from .errors import CaseError, UnsafePickleError

# (module, name) pairs a numpy object-array pickle legitimately references.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
_ALLOWED_DTYPE_CLASS_MODULES = ("numpy.dtypes",)

# Types that may appear once an object is rebuilt.
_PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None), np.ndarray, np.generic)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed for arrays and scalars."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
            module in _ALLOWED_DTYPE_CLASS_MODULES and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in pickle")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` allowing only plain containers and numpy arrays/scalars."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    _check_plain(obj)
    return obj


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 32:
        raise pickle.UnpicklingError("object nesting too deep")
    if not isinstance(obj, _PLAIN_TYPES):
        raise pickle.UnpicklingError(f"forbidden type {type(obj).__name__} in pickle")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, np.ndarray) and obj.dtype == object:
        for v in obj.ravel():
            _check_plain(v, depth + 1)


def _read_member(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    with zf.open(member) as fp:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            shape, fortran, dtype = npformat._read_array_header(fp, version)  # (3, 0)
        if not dtype.hasobject:
            fp.seek(0)
            return npformat.read_array(fp, allow_pickle=False)
        # Object array: the rest of the member is a pickle of the whole ndarray.
        arr = restricted_loads(fp.read())
        if not isinstance(arr, np.ndarray):
            raise pickle.UnpicklingError("object member is not an ndarray")
        return arr


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an npz into memory, safely.

    Raises :class:`CaseError` for a missing, truncated or non-zip file, and
    :class:`UnsafePickleError` for an object array whose pickle is not plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(path, "file does not exist")
    if path.is_dir():
        raise CaseError(path, "is a directory, not an npz file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise CaseError(path, f"not a valid npz (zip) file, maybe truncated: {exc}") from None
    except OSError as exc:
        raise CaseError(path, f"cannot open: {exc}") from None
    out: dict[str, np.ndarray] = {}
    with zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            key = member[:-4]
            try:
                out[key] = _read_member(zf, member)
            except pickle.UnpicklingError as exc:
                raise UnsafePickleError(path, f"key '{key}': refused to unpickle: {exc}") from None
            except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
                raise CaseError(path, f"key '{key}' is corrupt or truncated: {exc}") from None
            except Exception as exc:  # zlib.error and friends from a damaged member
                raise CaseError(path, f"key '{key}' cannot be read: {type(exc).__name__}: {exc}") from None
    return out
