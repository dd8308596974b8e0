"""Batched, on-device image augmentation (SimCLR/StableRep recipe) with per-image random draws.

Images arrive from Ray Data as a uint8 ``(B, H, W, 3)`` batch; the train loop moves it to its device and
calls :class:`BatchAugment`, which returns a normalised float32 ``(B, 3, S, S)`` batch. Everything is
vectorised over the batch (no Python loop over images) and every image gets its own random draw:

* RandomResizedCrop + horizontal flip: one ``F.grid_sample`` call with a per-image affine grid
  (bilinear, ``align_corners=False``); crop boxes follow torchvision's rejection sampling (area in
  ``crop_scale`` x image area, log-uniform aspect ratio in 3/4..4/3, ten tries, centre-crop fallback)
  but with sub-pixel boxes.
* Colour jitter with probability ``color_jitter_p``: brightness, contrast, saturation and hue, in an
  order drawn per image or fixed (``jitter_order``; torchvision's semantics per op; hue is a shift in
  HSV space, vectorised).
* Random grayscale (ITU-R 601 luma, as torchvision).
* Gaussian blur with probability ``blur_p`` and a per-image sigma: a separable depthwise convolution whose
  groups are the ``B*3`` image channels, kernel size about 10% of ``S`` (odd), reflect padding.
* Solarization with probability ``solarize_p``: values >= 0.5 inverted (torchvision's RandomSolarize).

Random parameters are drawn once per batch from a ``torch.Generator`` (:meth:`BatchAugment.sample`), so
the same seed gives the same output whatever the chunking, and :meth:`BatchAugment.apply` is a pure
function of the images and the parameters. The work runs with autocast disabled, so it is float32 even
inside a ``torch.autocast`` region.

:func:`eval_transform` is the deterministic evaluation counterpart (resize shorter side to
``S / 0.875``, centre crop ``S``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugmentConfig

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 0.875
_LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights
_JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue shift

__all__ = [
    "EVAL_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "BatchAugment",
    "blur_kernel_size",
    "denormalize",
    "eval_transform",
    "make_generator",
    "normalize",
    "to_float_chw",
]


# --------------------------------------------------------------------------------------------------
# helpers
def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (draws happen there, then move to the images)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel size of about 10% of the image side (SimCLR), at least 3."""
    k = int(0.1 * image_size)
    return max(3, k if k % 2 else k + 1)


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a tensor or numpy array of images, got {type(images).__name__}")
    if images.ndim == 3:  # a single HWC image
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected channels-last RGB images of shape (B, H, W, 3), got {tuple(images.shape)}"
        )
    return images


def to_float_chw(images) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 (or float in [0, 1]) tensor/array -> float32 ``(B, 3, H, W)`` in [0, 1].

    The result is a channels-last strided view of the input memory layout (no extra transpose copy).
    """
    images = _as_tensor(images)
    x = images.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or floating images, got {x.dtype}")
    return x.float()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` float in [0, 1] -> ImageNet-normalised (``(x - mean) / std``)."""
    mean, std = _stats(x)
    return torch.addcmul(-mean / std, x, 1.0 / std)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] (for image grids in TensorBoard)."""
    mean, std = _stats(x)
    return torch.addcmul(mean, x, std).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, 1, H, W)`` luma (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return torch.add(r * _LUMA[0], g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _mod6(t: torch.Tensor) -> torch.Tensor:
    """``t mod 6`` with arithmetic ops only (``torch.remainder`` is several times slower on CPU)."""
    return t.sub(torch.floor(t * (1.0 / 6.0)), alpha=6.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (``(B,)``, fraction of a turn) in HSV space, as torchvision's adjust_hue.

    Branch-free: the hue sector comes from 0/1 masks multiplied in (element-wise ``torch.where`` on a
    data-dependent mask and ``max`` with indices are slow on CPU). Saturation and value are kept; the
    RGB result is ``v - c * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``, ``n = 5, 3, 1``.
    """
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)  # chroma = v * s
    is_r = (v == r).to(x.dtype)
    is_g = (v == g).to(x.dtype) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    num = is_r * (g - b) + is_g * (b - r + 2.0 * c) + is_b * (r - g + 4.0 * c)
    h6 = num / c.clamp_min(1e-12) + 6.0 * shift.view(-1, 1, 1)  # 6 * hue; grey pixels: num = 0
    h6 = _mod6(h6)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = _mod6(h6.unsqueeze(1) + n)
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(v.unsqueeze(1), c.unsqueeze(1), a, value=-1.0).clamp_(0.0, 1.0)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable depthwise blur, one kernel per image (``sigma`` ``(B,)``; ``sigma <= 0`` = identity)."""
    B, C, H, W = x.shape
    half = kernel_size // 2
    pos = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    s = sigma.view(B, 1).clamp_min(1e-6)
    kern = torch.exp(-0.5 * (pos.view(1, -1) / s) ** 2)
    kern = kern / kern.sum(1, keepdim=True)
    delta = (pos == 0).to(x.dtype).expand(B, -1)
    kern = torch.where(sigma.view(B, 1) > 0, kern, delta)
    kern = kern.repeat_interleave(C, 0)  # (B*C, k): row b*C + c belongs to image b
    y = x.reshape(1, B * C, H, W)
    mode = "reflect" if half < min(H, W) else "replicate"
    y = F.pad(y, (half, half, 0, 0), mode=mode)
    y = F.conv2d(y, kern.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.pad(y, (0, 0, half, half), mode=mode)
    y = F.conv2d(y, kern.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def _jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue (torchvision's ColorJitter ops), applied to each
    image in its own ``order``; an op whose factors are all the identity is skipped."""
    ops = [
        lambda y, f: (y * f.view(-1, 1, 1, 1)).clamp(0.0, 1.0),
        lambda y, f: torch.lerp(_gray(y).mean((1, 2, 3), keepdim=True), y, f.view(-1, 1, 1, 1)).clamp(0.0, 1.0),
        lambda y, f: torch.lerp(_gray(y), y, f.view(-1, 1, 1, 1)).clamp(0.0, 1.0),
        lambda y, f: _adjust_hue(y, f),
    ]
    identity = torch.tensor(_JITTER_IDENTITY, device=factors.device, dtype=factors.dtype)
    active = (factors != identity).any(dim=0).tolist()
    y = x.clone()
    for position in range(4):
        for op, apply in enumerate(ops):
            sel = order[:, position] == op
            if active[op] and sel.any():
                y[sel] = apply(y[sel], factors[sel, op])
    return y


# --------------------------------------------------------------------------------------------------
@dataclass
class AugmentParams:
    """Per-image random draws for one batch (all tensors have leading dimension B).

    ``box`` holds ``(top, left, height, width)`` crop boxes in input pixels (sub-pixel, inside the image);
    ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize`` are boolean masks; ``factors`` is ``(B, 4)`` brightness,
    contrast, saturation multipliers and hue shift; ``order`` ``(B, 4)`` the order the four jitter ops
    run in; ``sigma`` the blur sigma; ``down`` the size an image is first resized to and back (0: not).
    """

    box: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    order: torch.Tensor
    down: torch.Tensor
    solarize: torch.Tensor

    @staticmethod
    def select(choice: torch.Tensor, options: list[AugmentParams]) -> AugmentParams:
        """Image b's draws from ``options[choice[b]]`` (draws of several recipes for one batch)."""
        rows = torch.arange(len(choice), device=choice.device)
        return AugmentParams(**{f.name: torch.stack([getattr(o, f.name) for o in options])[choice, rows]
                                for f in fields(AugmentParams)})

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index) -> AugmentParams:
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return self.box.shape[0]


class BatchAugment:
    """Training augmentation of a whole uint8 ``(B, H, W, 3)`` batch on its own device.

    ``BatchAugment(cfg, image_size)(images, generator) -> (B, 3, S, S)`` float32, ImageNet-normalised.
    ``chunk_size`` bounds peak memory: parameters are drawn for the whole batch, then the images are
    processed ``chunk_size`` at a time (results do not depend on it).
    """

    def __init__(
        self,
        cfg: AugmentConfig | None = None,
        image_size: int = 224,
        *,
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        crop_attempts: int = 10,
        chunk_size: int | None = 1024,
        normalize: bool = True,
    ):
        cfg = cfg if cfg is not None else AugmentConfig()
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        lo, hi = cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale: need 0 < low <= high <= 1, got {lo, hi}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio: need 0 < low <= high, got {ratio}")
        slo, shi = cfg.blur_sigma
        if not 0 < slo <= shi:
            raise ValueError(f"augment.blur_sigma: need 0 < low <= high, got {slo, shi}")
        if any(s < 0 for s in cfg.color_jitter) or cfg.color_jitter[3] > 0.5:
            raise ValueError(
                f"augment.color_jitter: strengths must be >= 0 and hue <= 0.5, got {cfg.color_jitter}"
            )
        self.cfg = cfg
        self.image_size = int(image_size)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.crop_attempts = int(crop_attempts)
        self.chunk_size = chunk_size
        self.normalize = normalize
        self.kernel_size = blur_kernel_size(self.image_size)

    def __repr__(self) -> str:
        return (
            f"BatchAugment(image_size={self.image_size}, cfg={self.cfg!r}, ratio={self.ratio}, "
            f"kernel_size={self.kernel_size})"
        )

    # -- random draws ---------------------------------------------------------------------------
    def sample(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw per-image parameters for a ``(batch_size, height, width, 3)`` batch.

        Draws happen on the generator's device; without a generator, from torch's global CPU RNG.
        """
        B, H, W, cfg = batch_size, float(height), float(width), self.cfg
        dev = generator.device if generator is not None else torch.device("cpu")

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=dev)

        # RandomResizedCrop (torchvision's rejection sampling, vectorised over B x attempts)
        n = self.crop_attempts
        lo, hi = cfg.crop_scale
        area = H * W * (lo + (hi - lo) * rand(B, n))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(B, n))
        cw = torch.sqrt(area * aspect)
        ch = torch.sqrt(area / aspect)
        ok = (cw <= W) & (ch <= H)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first accepted attempt
        any_ok = ok.any(1)
        cw = cw.gather(1, first).squeeze(1)
        ch = ch.gather(1, first).squeeze(1)
        in_ratio = W / H
        if in_ratio < self.ratio[0]:
            fw, fh = W, W / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fw, fh = H * self.ratio[1], H
        else:
            fw, fh = W, H
        cw = torch.where(any_ok, cw, torch.full_like(cw, fw))
        ch = torch.where(any_ok, ch, torch.full_like(ch, fh))
        u = rand(B, 2)
        top = torch.where(any_ok, u[:, 0] * (H - ch), (H - ch) / 2)
        left = torch.where(any_ok, u[:, 1] * (W - cw), (W - cw) / 2)
        box = torch.stack([top, left, ch, cw], 1)

        flip = rand(B) < cfg.flip_p

        # colour jitter factors (identity where the jitter is not applied)
        jitter = rand(B) < cfg.color_jitter_p
        b, c, s, h = cfg.color_jitter
        f = rand(B, 4) * 2.0 - 1.0
        strength = torch.tensor([b, c, s, h], device=dev)
        factors = f * strength
        factors[:, :3] += 1.0
        factors[:, :3].clamp_(min=0.0)
        identity = torch.tensor(_JITTER_IDENTITY, device=dev)
        factors = torch.where(jitter.unsqueeze(1), factors, identity)

        gray = rand(B) < cfg.grayscale_p

        blur = rand(B) < cfg.blur_p
        slo, shi = cfg.blur_sigma
        sigma = slo + (shi - slo) * rand(B)
        sigma = torch.where(blur, sigma, torch.zeros_like(sigma))

        # drawn last, so the draws above do not depend on these settings
        if cfg.jitter_order == "random":
            order = rand(B, 4).argsort(dim=1)
        else:
            order = torch.arange(4, device=dev).expand(B, 4)
        sizes = torch.tensor(cfg.downsample_sizes or [0], device=dev)
        pick = (rand(B) * len(sizes)).long().clamp_(max=len(sizes) - 1)
        down = torch.where(rand(B) < cfg.downsample_p, sizes[pick], torch.zeros_like(sizes[pick]))
        solarize = rand(B) < cfg.solarize_p
        return AugmentParams(box, flip, jitter, factors, gray, blur, sigma, order, down, solarize)

    # -- deterministic application ----------------------------------------------------------------
    def apply(self, images, params: AugmentParams) -> torch.Tensor:
        """Apply drawn ``params`` to a uint8 ``(B, H, W, 3)`` batch -> float32 ``(B, 3, S, S)``."""
        images = _as_tensor(images)
        B = images.shape[0]
        if len(params) != B:
            raise ValueError(f"params are for {len(params)} images, the batch has {B}")
        S = self.image_size
        if B == 0:
            return torch.empty(0, 3, S, S, device=images.device, dtype=torch.float32)
        params = params.to(images.device)
        step = self.chunk_size or B
        with torch.autocast(device_type=images.device.type, enabled=False):
            if step >= B:
                return self._apply_chunk(images, params)
            out = torch.empty(B, 3, S, S, device=images.device, dtype=torch.float32)
            for start in range(0, B, step):  # chunks bound memory; not a per-image loop
                sl = slice(start, start + step)
                out[sl] = self._apply_chunk(images[sl], params[sl])
        return out

    def __call__(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        images = _as_tensor(images)
        B, H, W, _ = images.shape
        return self.apply(images, self.sample(B, H, W, generator))

    def _apply_chunk(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        S = self.image_size
        x = to_float_chw(images)
        B, _, H, W = x.shape

        # low resolution: resize down and back up before everything else
        for size in p.down.unique().tolist():
            if 0 < size < min(H, W):
                sel = p.down == size
                small = F.interpolate(x[sel], size=(size, size), mode="bilinear", antialias=True)
                x[sel] = F.interpolate(small, size=(H, W), mode="bilinear")

        # crop + resize + flip: one grid_sample with per-image affine grids
        top, left, ch, cw = p.box.float().unbind(1)
        sx = torch.where(p.flip, -cw / W, cw / W)  # flip = negated x scale
        cx = (2.0 * left + cw) / W - 1.0
        sy, cy = ch / H, (2.0 * top + ch) / H - 1.0
        # per-image affine grid (no rotation, so it is separable; same as F.affine_grid with
        # theta = [[sx, 0, cx], [0, sy, cy]]); output pixel centres, align_corners=False
        base = (torch.arange(S, device=x.device, dtype=torch.float32) * 2.0 + (1.0 - S)) / S
        gx = torch.addcmul(cx.view(B, 1, 1), sx.view(B, 1, 1), base.view(1, 1, S)).expand(B, S, S)
        gy = torch.addcmul(cy.view(B, 1, 1), sy.view(B, 1, 1), base.view(1, S, 1)).expand(B, S, S)
        grid = torch.stack([gx, gy], dim=-1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        x = x.contiguous()  # NCHW for the per-channel ops below

        # colour jitter: the four ops in each image's own order
        # each op runs when some image drew it (a batch may mix recipes: AugmentParams.select)
        if p.jitter.any():
            x = torch.where(p.jitter.view(B, 1, 1, 1), _jitter(x, p.factors.float(), p.order), x)

        if p.gray.any():
            x = torch.where(p.gray.view(B, 1, 1, 1), _gray(x).expand_as(x), x)

        if p.blur.any():
            x = _gaussian_blur(x, p.sigma.float(), self.kernel_size)
        if p.solarize.any():
            x = torch.where(p.solarize.view(B, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)

        return normalize(x) if self.normalize else x


# --------------------------------------------------------------------------------------------------
def eval_transform(
    images, image_size: int, crop_pct: float = EVAL_CROP_PCT, normalize_output: bool = True
) -> torch.Tensor:
    """Deterministic evaluation view: ``(B, H, W, 3)`` uint8 tensor/array -> float32 ``(B, 3, S, S)``.

    The shorter side is resized (bilinear, antialiased) to ``round(S / crop_pct)`` and the centre
    ``S x S`` is cut out, as in the standard ImageNet evaluation. Images whose shorter side is already
    below that size (small synthetic images) are resized so the shorter side is ``S`` instead, then
    centre-cropped, so no extra border is thrown away by upsampling. Runs on the input's device.
    """
    images = _as_tensor(images)
    S = int(image_size)
    if S <= 0 or not 0 < crop_pct <= 1:
        raise ValueError(f"need image_size > 0 and 0 < crop_pct <= 1, got {image_size}, {crop_pct}")
    device = images.device
    with torch.autocast(device_type=device.type, enabled=False):
        x = to_float_chw(images)
        H, W = x.shape[-2:]
        target = round(S / crop_pct)
        short = min(H, W)
        if short < target:
            target = S
        if short != target:
            scale = target / short
            if H <= W:
                size = (target, max(target, round(W * scale)))
            else:
                size = (max(target, round(H * scale)), target)
            x = F.interpolate(
                x.contiguous(), size=size, mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        H, W = x.shape[-2:]
        top = round((H - S) / 2.0)
        left = round((W - S) / 2.0)
        x = x[:, :, top : top + S, left : left + S].contiguous()
        return normalize(x) if normalize_output else x
