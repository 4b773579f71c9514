"""The judge's augmentations: colour jitter, grayscale, elastic warp, blur and noise (deterministic per generator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GRAYSCALE_P", "augment", "degrade"]

_LUMA = (0.299, 0.587, 0.114)
GRAYSCALE_P = 0.3


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True).expand_as(x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable gaussian blur of ``x`` ``[B, C, H, W]`` with one ``sigma`` (px) per image; edges replicated."""
    r = radius
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).view(len(x), 1, 2 * r + 1, 1, 1)
    y = F.pad(x, (r, r, r, r), mode="replicate")
    h, w = x.shape[2], x.shape[3]
    y = sum(k[:, :, i] * y[:, :, :, i: i + w] for i in range(2 * r + 1))  # horizontal
    return sum(k[:, :, i] * y[:, :, i: i + h, :] for i in range(2 * r + 1))  # vertical


def _warp(x: torch.Tensor, amp: torch.Tensor, gen: torch.Generator, cells: int = 4) -> torch.Tensor:
    """Elastic warp of ``x`` ``[B, C, H, W]``: a random ``cells x cells`` field of displacements (at most ``amp`` px
    per image), bicubically upsampled, moves every pixel; edges replicated."""
    b, _, h, w = x.shape
    coarse = (torch.rand(b, 2, cells, cells, generator=gen) * 2 - 1) * amp.view(b, 1, 1, 1)
    flow = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0) + flow * torch.tensor([2 / (w - 1), 2 / (h - 1)])
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def degrade(x: torch.Tensor, seed: int = 0, sigma: float = 0.8, noise: float = 0.03) -> torch.Tensor:
    """A fixed "generated-looking" degradation of canonical images: gaussian blur then gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    y = _blur(x, torch.full((len(x),), sigma)) + noise * torch.randn(x.shape, generator=gen)
    return y.clamp(0, 1)


def augment(x: torch.Tensor, gen: torch.Generator, grayscale_p: float = GRAYSCALE_P) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation of canonical images ``x`` ``[B, 3, 64, 64]``; returns (images, grayscale mask).

    Per image: a smooth elastic warp (p=0.5, displacements up to 4 px: generated silhouettes are wobbly copies of
    the rendered ones, and a judge trained on crisp shapes alone took generated instances that a person recognises
    for "none"), mild colour jitter (p=0.8: brightness and contrast x[0.85, 1.15], saturation x[0.8, 1.2], hue
    +-0.08 rad), grayscale (p=``grayscale_p``), gaussian blur (p=0.5, sigma 0.3-1.8 px), gaussian noise
    (p=0.35, std 0.005-0.04). Deterministic given ``gen``.
    """
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) < p

    jit = coin(0.8)
    one = torch.ones(b)
    bright = torch.where(jit, u(0.85, 1.15), one)
    contrast = torch.where(jit, u(0.85, 1.15), one)
    sat = torch.where(jit, u(0.8, 1.2), one)
    hue = torch.where(jit, u(-0.08, 0.08), torch.zeros(b))
    gray_mask = coin(grayscale_p)
    warp_mask = coin(0.5)
    warp_amp = u(0.5, 4.0)
    blur_mask = coin(0.5)
    sigma = u(0.3, 1.8)
    noise_mask = coin(0.35)
    noise_std = u(0.005, 0.04)

    # Colour: every step is affine in RGB, so compose one 3x3 matrix and offset per image.
    eye = torch.eye(3).expand(b, 3, 3)
    w = torch.tensor(_LUMA)
    to_luma = torch.ones(3, 1) * w  # rows = luma weights: L = to_luma @ rgb, replicated on 3 channels
    mean_luma = torch.einsum("c,bchw->b", w, x) / (x.shape[2] * x.shape[3])
    mat = bright.view(b, 1, 1) * eye  # brightness
    off = (1 - contrast) * bright * mean_luma  # contrast around the (brightened) mean luma
    mat = contrast.view(b, 1, 1) * mat
    sat_m = sat.view(b, 1, 1) * eye + (1 - sat).view(b, 1, 1) * to_luma  # saturation
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = torch.cos(hue), torch.sin(hue)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    hue_m = torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq  # rotate the chroma plane of YIQ
    gray_m = torch.where(gray_mask.view(b, 1, 1), to_luma.expand(b, 3, 3), eye)
    post = gray_m @ hue_m @ sat_m  # all fix luma-weighted grey, so the offset passes through them as grey
    mat = post @ mat
    off3 = post @ (off.view(b, 1, 1) * torch.ones(b, 3, 1))
    x = (torch.bmm(mat, x.reshape(b, 3, -1)) + off3).view_as(x)

    idx = warp_mask.nonzero().flatten()
    if len(idx):
        x = x.index_copy(0, idx, _warp(x[idx], warp_amp[idx], gen))
    idx = blur_mask.nonzero().flatten()
    if len(idx):
        x = x.index_copy(0, idx, _blur(x[idx], sigma[idx]))
    idx = noise_mask.nonzero().flatten()
    if len(idx):
        noise = torch.randn((len(idx), *x.shape[1:]), generator=gen) * noise_std[idx].view(-1, 1, 1, 1)
        x = x.index_add(0, idx, noise)
    return x.clamp(0, 1), gray_mask
