"""A mask decoder whose image-side work is done once per image, not once per prompt.

SAM2's mask decoder runs its two-way transformer on a copy of the image tokens for every
prompt (image-to-token attention updates the image tokens, then two transposed convolutions
upscale them), so six boxes on a slice cost six times the image-side work. ``LiteMaskDecoder``
keeps SAM2's token side and drops everything that makes the image side depend on the prompt:

* the prompt tokens (output tokens + SAM2's sparse prompt embeddings) attend to the image
  tokens (token-to-image cross-attention, self-attention, MLP; ``depth`` blocks and a final
  cross-attention), but the image tokens are never updated by the prompts, so the keys and
  values of the image are projected once per image and shared by all its prompts;
* the upscaled per-pixel embedding (transposed convolutions + the encoder's high-res features,
  as in SAM2) is computed once per image from the encoder's output;
* the mask is the dot product of one hypernetwork vector per prompt with that shared
  embedding (single-mask output only: no multimask heads), the IoU head reads the IoU token.

Per prompt, what is left is attention over ``E*E`` keys for a handful of tokens. Dense prompts
(``mask_input``) are not used by this decoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _CrossAttention(nn.Module):
    """Multi-head attention of prompt tokens (B, T, C) over image tokens (Ni, N, C), Ni in {1, B}.

    Written with ``matmul`` so that Ni = 1 broadcasts over the B prompts (inference: one image,
    many boxes) without repeating the image; Ni = B pairs them (training).
    """

    def __init__(self, dim: int, heads: int, inner: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def keys(self, k_in: torch.Tensor, v_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the image side once: (Ni, heads, N, d) keys and values."""
        return self._split(self.k(k_in)), self._split(self.v(v_in))

    def forward(self, q_in: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        k, v = kv
        q = self._split(self.q(q_in))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
        o = torch.matmul(attn, v)  # (B, heads, T, d)
        b, h, t, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, t, h * d))


class _TokenBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, cross_inner: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross = _CrossAttention(dim, heads, cross_inner)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, token_pe: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = tokens + token_pe
        tokens = self.norm1(tokens + self.self_attn(q, q, tokens, need_weights=False)[0])
        tokens = self.norm2(tokens + self.cross(tokens + token_pe, kv))
        return self.norm3(tokens + self.mlp(tokens))


class _LayerNorm2d(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _MLP(nn.Sequential):
    def __init__(self, dims: list[int]):
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class LiteMaskDecoder(nn.Module):
    """Single-mask decoder with image-side work shared by all prompts of an image.

    Inputs as SAM2's decoder with ``high_res_features`` (the student's already-projected
    32- and 64-channel maps at 4x and 2x the embedding grid). Returns ``(low_res (B, 1, 4E, 4E),
    iou (B, 1))``.
    """

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 1024,
                 cross_inner: int = 128, up_dim: int = 64):
        super().__init__()
        self.iou_token = nn.Embedding(1, dim)
        self.mask_token = nn.Embedding(1, dim)
        self.no_mask_embed = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.ModuleList(_TokenBlock(dim, heads, mlp_dim, cross_inner) for _ in range(depth))
        self.final = _CrossAttention(dim, heads, cross_inner)
        self.final_norm = nn.LayerNorm(dim)
        # Image side, once per image: SAM2's upscaling path, widened to ``up_dim`` channels.
        self.up1 = nn.ConvTranspose2d(dim, up_dim, kernel_size=2, stride=2)
        self.s1 = nn.Conv2d(64, up_dim, kernel_size=1)
        self.ln1 = _LayerNorm2d(up_dim)
        self.up2 = nn.ConvTranspose2d(up_dim, up_dim, kernel_size=2, stride=2)
        self.s0 = nn.Conv2d(32, up_dim, kernel_size=1)
        self.hyper = _MLP([dim, dim, dim, up_dim])
        self.iou_head = _MLP([dim, 256, 256, 1])

    def image_side(self, image_embed: torch.Tensor, image_pe: torch.Tensor, feat_s0: torch.Tensor,
                   feat_s1: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Keys/values of every attention layer and the upscaled embedding (Ni, up_dim, 4E, 4E)."""
        src = image_embed + self.no_mask_embed
        flat = src.flatten(2).transpose(1, 2)  # (Ni, E*E, C)
        pe = image_pe.flatten(2).transpose(1, 2)
        keys = flat + pe
        kvs = [blk.cross.keys(keys, flat) for blk in self.blocks] + [self.final.keys(keys, flat)]
        up = F.gelu(self.ln1(self.up1(src) + self.s1(feat_s1)))
        up = F.gelu(self.up2(up) + self.s0(feat_s0))
        return kvs, up

    def forward(self, image_embed: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                high_res_features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kvs, up = self.image_side(image_embed, image_pe, high_res_features[0], high_res_features[1])
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_token.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        token_pe = tokens
        for blk, kv in zip(self.blocks, kvs[:-1]):
            tokens = blk(tokens, token_pe, kv)
        tokens = self.final_norm(tokens + self.final(tokens + token_pe, kvs[-1]))
        hyper = self.hyper(tokens[:, 1])  # (B, up_dim)
        ni, c, h, w = up.shape
        # (B, 1, C) @ (Ni, C, H*W) -> (B, 1, H*W); Ni = 1 broadcasts over the prompts.
        masks = torch.matmul(hyper.unsqueeze(1), up.reshape(ni, c, h * w)).reshape(b, 1, h, w)
        iou = self.iou_head(tokens[:, 0])
        return masks, iou
