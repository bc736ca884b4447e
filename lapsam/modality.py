"""Modality parsed from a challenge case name: the field after ``2DBox_`` / ``3DBox_`` (``3DBox_CT_0566`` -> CT)."""

from __future__ import annotations

# Order matters: OCT must be tried before CT, and the longer spellings before the short ones.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("OCT", "OCT"),
    ("CT", "CT"),
    ("MR", "MR"),
    ("PET", "PET"),
    ("X-Ray", "XRay"),
    ("XRay", "XRay"),
    ("CXR", "XRay"),
    ("US", "US"),
    ("Fundus", "Fundus"),
    ("Endoscopy", "Endoscopy"),
    ("Endoscope", "Endoscopy"),
    ("Dermoscopy", "Dermoscopy"),
    ("Microscopy", "Microscopy"),
    ("Microscope", "Microscopy"),
    ("Mammography", "Mammography"),
)

MODALITIES: tuple[str, ...] = tuple(dict.fromkeys(m for _, m in _PREFIXES))
UNKNOWN = "Unknown"


def split_name(name: str) -> tuple[str | None, str]:
    """Return (dimension tag, rest) for a name like ``3DBox_CT_0566`` -> ("3D", "CT_0566")."""
    stem = name[:-4] if name.endswith(".npz") else name
    for tag in ("3DBox_", "2DBox_", "3D_", "2D_"):
        if stem.startswith(tag):
            return tag[:2], stem[len(tag):]
    return None, stem


def parse_modality(name: str) -> str:
    """Modality of a case from its file name; ``Unknown`` when no prefix matches.

    >>> parse_modality("2DBox_OCT_0001.npz"), parse_modality("3DBox_CT_0566")
    ('OCT', 'CT')
    """
    _, rest = split_name(name)
    low = rest.lower()
    for prefix, modality in _PREFIXES:
        p = prefix.lower()
        if low.startswith(p) and (len(low) == len(p) or not low[len(p)].isalpha()):
            return modality
    for prefix, modality in _PREFIXES:  # e.g. "Lesion_CT_..." : look for the token anywhere
        if f"_{prefix.lower()}_" in f"_{low}_":
            return modality
    return UNKNOWN
