"""``lapsam segment IMAGE --box ... -o MASK``: the page's formats on the command line, for scripts.

IMAGE is a NIfTI file, a DICOM series folder (or one .dcm), a PNG/JPG or a challenge npz (see
:mod:`lapsam.runtime.app.volume`); MASK is ``.nii.gz`` / ``.nii`` (the input's geometry),
``.npz`` (challenge ``segs``) or ``.png`` (2D). Box i becomes label i; boxes are in array
pixels: 2D ``x0,y0,x1,y1``, 3D ``x0,y0,z0,x1,y1,z1`` (the challenge's 3D box order; z is the
slice index as the app shows it). The model run is the one of ``lapsam predict``: a 2D image is
encoded once and every box decoded; a 3D box starts on its middle slice and propagates through
its z range, every slice encoded once. Light module: readers and numpy load inside the command.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lapsam.errors import UsageError

from .cli import MODEL_ENV, add_engine_args, add_propagation_args, default_model_dir

log = logging.getLogger(__name__)


def parse_box(text: str) -> list[int]:
    try:
        vals = [int(round(float(v))) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UsageError(f"--box {text!r}: give integers x0,y0,x1,y1 (2D) or x0,y0,z0,x1,y1,z1 (3D)") from None
    if len(vals) not in (4, 6):
        raise UsageError(f"--box {text!r}: {len(vals)} numbers; give x0,y0,x1,y1 (2D) or x0,y0,z0,x1,y1,z1 (3D)")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment one image (NIfTI, DICOM folder, PNG/JPG, npz) from boxes; mask with the input's geometry",
        description="Segment IMAGE from one or more boxes with an exported model (the runtime of lapsam "
        "predict) and write MASK: .nii.gz/.nii (the input's geometry: a NIfTI's header and affine, a DICOM "
        "series' origin/spacing/direction, an npz's spacing), .npz (challenge 'segs') or .png (2D). Box i is "
        "label i. Coordinates are array pixels as lapsam app shows them: 2D x0,y0,x1,y1; 3D "
        "x0,y0,z0,x1,y1,z1 (z = slice; the box is drawn on the middle slice and propagated through z0..z1). "
        "Needs the [app] extra for NIfTI, DICOM and PNG/JPG.",
    )
    p.add_argument("image", type=Path, help="NIfTI file, DICOM folder or .dcm, PNG/JPG, or challenge .npz")
    p.add_argument("--box", action="append", default=[], metavar="BOX",
                   help="x0,y0,x1,y1 or x0,y0,z0,x1,y1,z1 (repeat for more objects; default for an npz: its boxes)")
    p.add_argument("-o", "--output", required=True, type=Path, help="mask file: .nii.gz, .nii, .npz or .png")
    p.add_argument("--model", type=Path, default=None,
                   help=f"exported model folder with manifest.json (default: ${MODEL_ENV}, else models/default)")
    add_engine_args(p)
    p.add_argument("--window", default=None,
                   help="intensity window: ct-soft (L40 W400), ct-lung, ct-bone, ct-brain, ct-liver, percentile, "
                        "range, stored, or LEVEL,WIDTH (default: CT -> ct-soft, other -> percentile, uint8 -> stored)")
    add_propagation_args(p)
    p.set_defaults(func=cmd_segment)


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from lapsam.case import case_from_arrays

    from .app.segmenter import Segmenter, SegmenterConfig
    from .app.volume import mask_format, open_image, parse_window, write_mask

    fmt = mask_format(args.output)  # fail before any work
    for b in args.box:
        parse_box(b)
    if args.output.is_dir():
        raise UsageError(f"{args.output} is a folder; give the mask's file name")
    try:
        vol = open_image(args.image)
    except ImportError as exc:
        raise UsageError(f"reading {args.image.name} needs the [app] extra (pip install 'lapsam[app]'): {exc}") from None
    if fmt == "png" and vol.is_3d:
        raise UsageError(f"{args.output.name}: PNG masks are 2D; use .nii.gz or .npz for a 3D image")
    window = parse_window(args.window) if args.window else vol.default_window()
    if window.kind == "stored" and vol.data.dtype != np.uint8:
        raise UsageError(f"--window stored is for uint8 images; {vol.name} holds {vol.data.dtype}")
    if args.box:
        want = 6 if vol.is_3d else 4
        for b in map(parse_box, args.box):
            if len(b) != want:
                kind = "3D: x0,y0,z0,x1,y1,z1" if vol.is_3d else "2D: x0,y0,x1,y1"
                raise UsageError(f"--box {','.join(map(str, b))}: {vol.name} is {kind}")
        boxes = np.array([parse_box(b) for b in args.box], np.int64)
    elif vol.case is not None and vol.case.num_boxes:
        boxes = vol.case.boxes
    else:
        raise UsageError("give at least one --box")
    if vol.is_3d:
        image = vol.volume_u8(window)
    else:
        image = vol.slice_u8(0, window)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)  # the model sees grey as R = G = B
    name = f"{'3D' if vol.is_3d else '2D'}Box_{vol.name}"
    case = case_from_arrays(name, {"imgs": image, "boxes": boxes}, args.image)
    if case.box_errors:
        raise UsageError("; ".join(case.box_errors.values()))
    for w in case.warnings:
        if "spacing" not in w and "prefix" not in w:
            log.warning("%s", w)
    model = args.model or default_model_dir()
    t = time.perf_counter()
    seg = Segmenter.from_model_dir(model, backend=args.backend, threads=args.threads, precision=args.precision,
                                   cache_dir=args.cache_dir, precision_hint=args.precision_hint,
                                   config=SegmenterConfig(cache_mb=0, margin_px=args.margin,
                                                          prompt_3d=args.prompt_3d))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    if vol.is_3d:
        mid = (case.boxes[:, 2] + case.boxes[:, 5]) // 2
        from tqdm import tqdm

        with tqdm(total=0, unit="slice", disable=args.no_progress, desc=vol.name, leave=False) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            labels = seg.propagate(case.image, case.boxes, mid, args.on_empty, progress)
    else:
        labels = seg.segment_slice(case.image, case.boxes)[None]
    out = write_mask(vol, labels, args.output)
    n = len(case.boxes)
    print(f"{vol.name}: {n} object(s), {int((labels > 0).sum())} mask voxels -> {out} "
          f"({time.perf_counter() - t:.2f} s; model load {load_s:.2f} s)")
    return 0
