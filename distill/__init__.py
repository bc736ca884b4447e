"""lapsam.distill: SAM2 teacher -> timm student (LapSam), two-stage training, data preparation.

Entry points: ``lapsam distill prepare|encoder|finetune|students`` and ``lapsam bench distill``;
API: :mod:`.modeling` (the model: ``LapSam``, ``build_lapsam``, ``save_checkpoint``, ``load_lapsam``),
:mod:`.teacher` (``Teacher``), :mod:`.prepare`, :mod:`.data`, :mod:`.trainer` (the loop both stages
share), :mod:`.encoder_stage` (``train_encoder``), :mod:`.finetune_stage` (``train_finetune``). See README.md.
"""
