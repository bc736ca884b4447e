"""Export-friendly wrappers around a :class:`~lapsam.distill.modeling.LapSam`.

:class:`EncoderGraph` is the student encoder as is. :class:`DecoderGraph` puts SAM2's prompt
encoder inside the decoder graph and takes the fixed input set of the graph contract in
``lapsam.manifest``: boxes (B, 4), points (B, P, 2) + labels (B, P) with P possibly 0,
``mask_input`` (B, 1, L, L) and ``has_mask_input`` (B,). It computes exactly what
``LapSam.decode(..., repeat_image=True)`` computes:

* a box becomes two corner points labelled 2 and 3, placed before the clicks, and a padding
  point (label -1) is appended, as SAM2's prompt encoder does when no separate box is given;
  a box of -1s (``x_max < 0``) means clicks only: its two corners are padding points too;
* the dense prompt is ``mask_downscaling(mask_input)`` where ``has_mask_input`` is 1 and
  ``no_mask_embed`` where it is 0 (a blend, so one graph serves both cases);
* the dense positional encoding is a constant of the graph (it depends only on the grid);
* with the lite decoder (``LapSamConfig.decoder == "lite"``) the image side is computed once
  for all B prompts and ``mask_input`` is ignored;
* with a box prior (``LapSamConfig.box_prior``) the same :class:`~lapsam.distill.modeling.BoxPrior`
  module adds its learned +-s to the low-res logits inside the graph, so the runtime needs
  nothing to know about it.
"""

from __future__ import annotations

import torch
from torch import nn

from lapsam.distill.modeling.lite_decoder import LiteMaskDecoder


class EncoderGraph(nn.Module):
    """``image`` (1, 3, S, S) -> (image_embed, high_res_feats_0, high_res_feats_1)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_encoder(image)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder with the manifest's decoder inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.box_prior = model.box_prior
        self.lite = isinstance(model.mask_decoder, LiteMaskDecoder)
        # Constant of the graph: dense PE of the embedding grid (1, 256, E, E).
        self.register_buffer("dense_pe", model.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        boxes: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        b = boxes.shape[0]
        corners = boxes.reshape(-1, 2, 2)
        # A box row of -1s means "no box" (clicks only): its corners become padding points
        # (label -1), as in training, and get no box prior.
        has_box = (boxes[:, 2:3] >= 0).to(torch.float32)
        corner_labels = torch.tensor([2.0, 3.0], dtype=torch.float32).reshape(1, 2).expand(b, 2)
        corner_labels = has_box * corner_labels + (1.0 - has_box) * -1.0
        coords = torch.cat([corners, point_coords], dim=1)
        labels = torch.cat([corner_labels, point_labels], dim=1)
        sparse = pe._embed_points(coords, labels, pad=True)

        has = has_mask_input.reshape(-1, 1, 1, 1)
        if self.lite:
            # One image side for all B prompts; mask_input is not used by this decoder (kept as
            # a graph input, times zero, so every model has the manifest's input set).
            low_res, iou = self.mask_decoder(image_embed, self.dense_pe, sparse, [high_res_feats_0, high_res_feats_1])
            low_res = low_res + 0.0 * has * mask_input
            if self.box_prior is not None:
                low_res = self.box_prior(low_res, coords, labels)
            return low_res, iou
        mask_embed = pe.mask_downscaling(mask_input)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has * mask_embed + (1.0 - has) * no_mask

        out = self.mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        low_res = out[0]
        if self.box_prior is not None:
            low_res = self.box_prior(low_res, coords, labels)
        return low_res, out[1]


def example_decoder_inputs(input_size: int, num_boxes: int = 2, num_points: int = 1) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for :class:`DecoderGraph` (values only matter for tracing, not the graph)."""
    e = input_size // 16
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.8]] * num_boxes, dtype=torch.float32)[:num_boxes]
    return (
        torch.randn(1, 256, e, e, generator=g),
        torch.randn(1, 32, 4 * e, 4 * e, generator=g),
        torch.randn(1, 64, 2 * e, 2 * e, generator=g),
        boxes * input_size,
        torch.rand(num_boxes, num_points, 2, generator=g) * input_size,
        torch.ones(num_boxes, num_points, dtype=torch.float32),
        torch.zeros(num_boxes, 1, 4 * e, 4 * e),
        torch.zeros(num_boxes, dtype=torch.float32),
    )
