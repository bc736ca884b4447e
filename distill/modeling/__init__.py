"""lapsam.distill.modeling: the ``LapSam`` model (torch), kept apart from the training code.

* :mod:`.student`: the student image encoder (timm backbone + neck), ``StudentConfig``,
  ``SUPPORTED_BACKBONES``, ``build_student``, ``param_count``;
* :mod:`.prompt`: SAM2's prompt encoder and mask decoder (``build_prompt_heads``; ``NarrowMaskDecoder``) and ``BoxPrior``;
* :mod:`.lapsam`: ``LapSam`` (``encode`` / ``decode``), ``LapSamConfig``, ``build_lapsam``, ``student_table``;
* :mod:`.checkpoint`: ``save_checkpoint``, ``load_checkpoint_dict``, ``load_lapsam``.

Everything is re-exported here: ``from lapsam.distill.modeling import LapSam, load_lapsam``.
"""

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint_dict,
    load_lapsam,
    save_checkpoint,
)
from .lapsam import LapSam, LapSamConfig, build_lapsam, student_table
from .prompt import BoxPrior, NarrowMaskDecoder, build_prompt_heads, concat_prompts
from .student import (
    EMBED_DIM,
    HIGH_RES_DIMS,
    SUPPORTED_BACKBONES,
    StudentConfig,
    StudentEncoder,
    build_student,
    param_count,
)

__all__ = [
    "BoxPrior", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "EMBED_DIM", "HIGH_RES_DIMS", "LapSam", "LapSamConfig",
    "NarrowMaskDecoder", "SUPPORTED_BACKBONES", "StudentConfig", "StudentEncoder", "build_lapsam", "build_prompt_heads",
    "build_student", "concat_prompts", "load_checkpoint_dict", "load_lapsam", "param_count", "save_checkpoint", "student_table",
]
