"""Every training augmentation, batched on the device, each a function of (batch, generator).

- `crop_flip`: the zero-padded random crop and horizontal flip every run uses, one gather for
  the whole batch (the loader draws its parameters for the global batch and crops its slice).
- `RandAugment`: timm's `rand-m9-mstd0.5-inc1` and the like, on uint8 images. Every image draws
  its own ops and magnitudes; each layer applies them to the whole batch at once as one lookup
  table (point ops), one blend (enhance ops) and one affine resampling (geometric ops), with
  per-image masks instead of a loop over images.
- `random_erasing`: timm's RandomErasing, 'pixel' mode, one box per image.
- `Mixup`: timm's MixUp/CutMix (batch, pair and elem modes), soft targets.

Per-pixel draws come from the loader's device generator; the few per-batch scalars of MixUp come
from its host generator, so that slicing a batch needs no read from the device.
`build_batch_transform` puts together what an `AugConfig` asks for, or returns None. The parser
of RandAugment strings stays in config.py: AugConfig checks them when it is built, at the
command line, where torch is not imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from convnext_cifar.config import AugConfig, RandAugmentSpec, parse_randaugment
from convnext_cifar.runtime import to_device

# timm's op lists (auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS), same order
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
POINT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
             "SolarizeIncreasing", "SolarizeAdd")
ENHANCE_OPS = ("Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
               "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


# ---- random crop and flip (every run) ----------------------------------------------------------

def draw_crop_flip(n: int, padding: int, flip_prob: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (n, 2) in [0, 2*padding] and flip flags (n,) for a batch of n images."""
    dev = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=dev)
    flips = torch.rand(n, generator=generator, device=dev) < flip_prob
    return offsets, flips


def crop_flip(images: torch.Tensor, padding: int, flip_prob: float,
              generator: torch.Generator, params: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, then a random horizontal flip.

    One gather does both for the whole batch; the result is NCHW with channels_last strides.
    `params` (offsets, flips) are drawn from `generator` unless given.
    """
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    offsets, flips = params or draw_crop_flip(n, padding, flip_prob, generator)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = offsets[:, :1] + ys  # (n, h)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - xs, xs)  # (n, w)
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


# ---- RandAugment --------------------------------------------------------------------------------

class RandAugment:
    """timm's RandAugment on a uint8 batch (N, 3, H, W): per image and layer one op drawn
    uniformly (with replacement across layers, as timm), applied with probability p at a
    magnitude drawn around m; geometric ops fill with `fill` (the dataset mean, as timm's
    img_mean) and resample bicubically (the official recipe's interpolation)."""

    def __init__(self, spec: RandAugmentSpec, fill: tuple[float, float, float]):
        self.spec = spec
        self.ops = RAND_OPS_INCREASING if spec.increasing else RAND_OPS
        self.fill = tuple(float(round(v)) for v in fill)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, dev, s = len(x), x.device, self.spec
        for _ in range(s.num_layers):
            op = torch.randint(0, len(self.ops), (n,), generator=generator, device=dev)
            applied = torch.rand(n, generator=generator, device=dev) <= s.prob
            f64 = {"generator": generator, "device": dev, "dtype": torch.float64}  # as timm
            if s.magnitude_std == math.inf:
                magnitude = torch.rand(n, **f64) * s.magnitude
            elif s.magnitude_std > 0:
                magnitude = s.magnitude + s.magnitude_std * torch.randn(n, **f64)
            else:
                magnitude = torch.full((n,), float(s.magnitude), dtype=torch.float64, device=dev)
            level = magnitude.clamp(0, s.magnitude_max) / 10.0  # timm's _LEVEL_DENOM
            negate = torch.rand(n, generator=generator, device=dev) > 0.5
            x = apply_ops(x, torch.where(applied, op, -1), level, negate, self.ops, self.fill)
        return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, level: torch.Tensor, negate: torch.Tensor,
              names: tuple[str, ...], fill: tuple[float, float, float]) -> torch.Tensor:
    """Apply op `names[op[i]]` at `level[i]` (magnitude / 10, float64) to image i (op -1: none).

    `negate[i]` flips the sign of the signed ops (rotate, shear, translate, increasing
    enhance), as timm's _randomly_negate does.
    """
    chosen = {name: op == i for i, name in enumerate(names)}
    sign = torch.where(negate, -1.0, 1.0)
    x = _point_ops(x, chosen, level)
    x = _enhance_ops(x, chosen, level, sign)
    return _affine_ops(x, chosen, level, sign, fill)


def _point_ops(x: torch.Tensor, chosen: dict[str, torch.Tensor], level: torch.Tensor
               ) -> torch.Tensor:
    """All per-pixel-value ops as one lookup table per image and channel."""
    names = [name for name in POINT_OPS if name in chosen]
    if not names:
        return x
    n, c = x.shape[:2]
    values = torch.arange(256, device=x.device)
    lut = values.expand(n, c, 256)
    lvl = level.double()[:, None, None]
    for name in names:
        if name == "AutoContrast":
            table = _autocontrast_lut(x)
        elif name == "Equalize":
            table = _equalize_lut(x)
        elif name == "Invert":
            table = 255 - values.expand(n, c, 256)
        elif name.startswith("Posterize"):
            bits = (lvl * 4).floor().long()  # timm: int(level * 4) bits kept
            bits = 4 - bits if name.endswith("Increasing") else bits
            mask = ~((1 << (8 - bits.clamp(0, 8))) - 1)
            table = torch.where(bits >= 8, values, values & mask).expand(n, c, 256)
        elif name.startswith("Solarize") and name != "SolarizeAdd":
            thresh = (lvl * 256).floor().clamp(max=256).long()  # timm: min(256, int(l * 256))
            thresh = 256 - thresh if name.endswith("Increasing") else thresh
            table = torch.where(values < thresh, values, 255 - values).expand(n, c, 256)
        else:  # SolarizeAdd: brighten the dark half
            add = (lvl * 110).floor().clamp(max=128).long()
            table = torch.where(values < 128, (values + add).clamp(max=255), values)
            table = table.expand(n, c, 256)
        lut = torch.where(chosen[name][:, None, None], table, lut)
    flat = x.reshape(n, c, -1).long()
    return lut.gather(2, flat).to(torch.uint8).view_as(x)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 256) counts of each value per image and channel (scatter_add: unlike bincount,
    no read of the maximum on a GPU)."""
    n, c = x.shape[:2]
    offsets = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1)
    flat = (x.reshape(n, c, -1).long() + offsets).reshape(-1)
    counts = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(n, c, 256)


def _autocontrast_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast (no cutoff): stretch each channel's [min, max] to [0, 255]."""
    flat = x.reshape(*x.shape[:2], -1)
    lo = flat.amin(2, keepdim=True).double()
    hi = flat.amax(2, keepdim=True).double()
    values = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # a true division, as PIL's
    table = (values * scale - lo * scale).trunc().clamp(0, 255).long()
    return torch.where(hi > lo, table, values.long())


def _equalize_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel: a step of (pixels - last bin) // 255."""
    hist = _histogram(x)
    values = torch.arange(256, device=x.device)
    last = torch.where(hist > 0, values, -1).amax(2, keepdim=True)
    last_count = hist.gather(2, last.clamp(min=0))
    step = (hist.sum(2, keepdim=True) - last_count) // 255
    before = hist.cumsum(2) - hist  # pixels below each value
    table = ((step // 2 + before) // step.clamp(min=1)).clamp(0, 255)
    flat = (hist > 0).sum(2, keepdim=True) <= 1
    return torch.where(flat | (step == 0), values, table)


def _enhance_ops(x: torch.Tensor, chosen: dict[str, torch.Tensor], level: torch.Tensor,
                 sign: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance (Color, Contrast, Brightness, Sharpness) as one blend: degenerate +
    factor * (image - degenerate), clipped and truncated to uint8 as PIL's blend does."""
    names = [name for name in ENHANCE_OPS if name in chosen]
    if not names:
        return x
    img = x.float()
    gray = _luma(x)  # PIL's convert("L"), as integers
    degenerate = torch.zeros_like(img)
    factor = torch.ones_like(level)
    any_enhance = torch.zeros_like(chosen[names[0]])
    for name in names:
        sel = chosen[name]
        if name.endswith("Increasing"):  # timm: max(0.1, 1 + random sign * level * 0.9)
            f = (1.0 + sign * level * 0.9).clamp(min=0.1)
        else:
            f = level * 1.8 + 0.1
        if name.startswith("Color"):
            deg = gray.expand_as(img)
        elif name.startswith("Contrast"):
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            deg = (mean + 0.5).floor().expand_as(img)
        elif name.startswith("Brightness"):
            deg = torch.zeros_like(img)
        else:
            deg = _smooth(img)
        degenerate = torch.where(sel[:, None, None, None], deg, degenerate)
        factor = torch.where(sel, f, factor)
        any_enhance = any_enhance | sel
    out = (degenerate + factor[:, None, None, None] * (img - degenerate)).clamp(0, 255)
    return torch.where(any_enhance[:, None, None, None], out.to(torch.uint8), x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as float (N, 1, H, W)."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, 13ths), rounded; the border stays as it was."""
    kernel = torch.ones(3, 3, device=img.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(img.shape[1], 1, 3, 3)
    inner = F.conv2d(img, kernel, groups=img.shape[1]).round()
    out = img.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _affine_ops(x: torch.Tensor, chosen: dict[str, torch.Tensor], level: torch.Tensor,
                sign: torch.Tensor, fill: tuple[float, float, float]) -> torch.Tensor:
    """Rotate, shear and translate as one resampling of the batch: each image its own affine
    map (PIL's convention: output pixel centre -> input point), bicubic, filled outside."""
    names = [name for name in AFFINE_OPS if name in chosen]
    if not names:
        return x
    n, _, h, w = x.shape
    dev = x.device
    eye = torch.eye(3, device=dev).expand(n, 3, 3)
    matrix = eye
    moved = torch.zeros(n, dtype=torch.bool, device=dev)
    for name in names:
        m = eye.clone()
        if name == "Rotate":  # counter-clockwise by level * 30 degrees about the centre
            angle = torch.deg2rad(sign * level * 30.0)
            cos, sin = torch.cos(angle), torch.sin(angle)
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
            cx, cy = w / 2.0, h / 2.0
            m[:, 0, 2] = cx - cos * cx + sin * cy
            m[:, 1, 2] = cy - sin * cx - cos * cy
        elif name == "ShearX":
            m[:, 0, 1] = sign * level * 0.3
        elif name == "ShearY":
            m[:, 1, 0] = sign * level * 0.3
        elif name == "TranslateXRel":  # timm's translate_pct 0.45 of the width
            m[:, 0, 2] = sign * level * 0.45 * w
        else:
            m[:, 1, 2] = sign * level * 0.45 * h
        sel = chosen[name]
        matrix = torch.where(sel[:, None, None], m, matrix)
        moved = moved | sel
    # pixel coordinates (centres at i + 0.5) -> affine_grid's [-1, 1] (align_corners=False)
    to_norm, to_pix = eye.clone(), eye.clone()
    to_norm[:, 0, 0], to_norm[:, 1, 1], to_norm[:, :2, 2] = 2.0 / w, 2.0 / h, -1.0
    to_pix[:, 0, 0], to_pix[:, 1, 1], to_pix[:, 0, 2], to_pix[:, 1, 2] = w / 2, h / 2, w / 2, h / 2
    theta = (to_norm @ matrix @ to_pix)[:, :2]
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    sampled = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border",
                            align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    colour = _channel_values(fill, dev)
    out = torch.where(inside, sampled.round().clamp(0, 255), colour).to(torch.uint8)
    return torch.where(moved[:, None, None, None], out, x)


# ---- random erasing -----------------------------------------------------------------------------

def random_erasing(x: torch.Tensor, prob: float, mean: tuple[float, ...], std: tuple[float, ...],
                   generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing ('pixel' mode, one box) on a float batch in 0-255 pixel space.

    Per image with probability `prob`: up to 10 tries of an area in [0.02, 1/3] of the image and
    an aspect ratio log-uniform in [0.3, 1/0.3]; the first box that fits is filled with per-pixel
    normal noise, which after normalisation is N(0, 1) as timm draws it after its Normalize.
    """
    n, c, h, w = x.shape
    dev = x.device

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=dev)

    erase = torch.rand(n, generator=generator, device=dev) < prob
    area = uniform(0.02, 1 / 3, n, attempts) * (h * w)
    aspect = torch.exp(uniform(math.log(0.3), math.log(1 / 0.3), n, attempts))
    bh = torch.round(torch.sqrt(area * aspect)).long()
    bw = torch.round(torch.sqrt(area / aspect)).long()
    fits = (bw < w) & (bh < h)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    top = (torch.rand(n, generator=generator, device=dev) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=generator, device=dev) * (w - bw + 1)).floor().long()
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = (ys >= top[:, None]) & (ys < (top + bh)[:, None])
    cols = (xs >= left[:, None]) & (xs < (left + bw)[:, None])
    box = rows[:, :, None] & cols[:, None, :] & (erase & fits.any(1))[:, None, None]
    noise = torch.randn(x.shape, generator=generator, device=dev)
    noise = noise * _channel_values(std, dev) + _channel_values(mean, dev)
    return torch.where(box[:, None], noise, x)


_constants: dict[tuple, torch.Tensor] = {}


def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) per-channel constants on `device`, copied there once (a copy from host
    memory every step would wait for the GPU)."""
    key = (tuple(values), str(device))
    if key not in _constants:
        _constants[key] = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return _constants[key]


# ---- MixUp / CutMix -----------------------------------------------------------------------------

@dataclass
class MixParams:
    """What one batch's mixing was drawn to be (host arrays, one entry per image).

    Image i is mixed with image N-1-i (the batch flipped, as timm does): by `lam[i]`, or, where
    `cutmix[i]`, by pasting the partner's box rows yl:yh, columns xl:xh (`lam` then the share of
    the image outside the box).
    """

    lam: np.ndarray  # (N,) float64 per batch, float32 per pair/image (as timm keeps them)
    cutmix: np.ndarray  # (N,) bool
    boxes: np.ndarray  # (N, 4) yl, yh, xl, xh

    @property
    def per_batch(self) -> bool:
        return bool((self.lam == self.lam[0]).all() and (self.boxes == self.boxes[0]).all()
                    and (self.cutmix == self.cutmix[0]).all())


class Mixup:
    """timm's Mixup (correct_lam=True) for a float batch and integer labels -> soft targets.

    The label smoothing timm folds into its targets is left to the loss (the same numbers:
    smoothing is linear in the target).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 mode: str, num_classes: int):
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.num_classes = num_classes

    def draw(self, n: int, h: int, w: int, rng: np.random.Generator) -> MixParams:
        """Mixing parameters for a batch of n images of h x w, from the host generator."""
        count = 1 if self.mode == "batch" else n // 2 if self.mode == "pair" else n
        use = rng.random(count) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = rng.random(count) < self.switch_prob
            lam = np.where(cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, count),
                           rng.beta(self.mixup_alpha, self.mixup_alpha, count))
        elif self.mixup_alpha > 0:
            cutmix = np.zeros(count, dtype=bool)
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, count)
        else:
            cutmix = np.ones(count, dtype=bool)
            lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha, count)
        cy, cx = rng.integers(0, h, count), rng.integers(0, w, count)
        return self.params(np.where(use, lam, 1.0), cutmix & use, cy, cx, n, h, w)

    def params(self, lam: np.ndarray, cutmix: np.ndarray, cy: np.ndarray, cx: np.ndarray,
               n: int, h: int, w: int) -> MixParams:
        """The boxes (timm's rand_bbox around centres cy, cx) and lambdas corrected to the
        boxes' real areas, one entry per image of a batch of n."""
        precision = np.float64 if self.mode == "batch" else np.float32  # as timm keeps lam
        lam = lam.astype(precision)
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = (h * ratio).astype(int), (w * ratio).astype(int)
        boxes = np.stack([np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h),
                          np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)],
                         1)
        cutmix = cutmix & (lam != 1)
        area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        lam = np.where(cutmix, 1.0 - area / float(h * w), lam).astype(precision)
        boxes = np.where(cutmix[:, None], boxes, 0)
        return self._spread(MixParams(lam, cutmix, boxes), n)

    def _spread(self, p: MixParams, n: int) -> MixParams:
        """Per-batch or per-pair draws as one entry per image."""
        if self.mode == "batch":
            return MixParams(np.repeat(p.lam, n), np.repeat(p.cutmix, n), np.repeat(p.boxes, n, 0))
        if self.mode == "pair":  # image N-1-i takes pair i's draw; an odd middle one is kept
            odd = n % 2
            return MixParams(
                np.concatenate([p.lam, np.ones(odd, np.float32), p.lam[::-1]]),
                np.concatenate([p.cutmix, np.zeros(odd, bool), p.cutmix[::-1]]),
                np.concatenate([p.boxes, np.zeros((odd, 4), p.boxes.dtype), p.boxes[::-1]]))
        return p

    def apply(self, x: torch.Tensor, labels: torch.Tensor, p: MixParams
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a float batch and make its soft targets (N, classes)."""
        flipped = x.flip(0)
        onehot = F.one_hot(labels, self.num_classes).to(x.dtype)
        if p.per_batch:  # one lambda and one box: plain slicing, no host values on the device
            lam = float(p.lam[0])
            if p.cutmix[0]:
                yl, yh, xl, xh = (int(v) for v in p.boxes[0])
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = flipped[:, :, yl:yh, xl:xh]
            elif lam != 1.0:
                x = x * lam + flipped * (1.0 - lam)
            return x, onehot * lam + onehot.flip(0) * (1.0 - lam)
        lam = to_device(torch.from_numpy(p.lam.astype(np.float32)), x.device)
        cutmix = to_device(torch.from_numpy(p.cutmix), x.device)
        boxes = to_device(torch.from_numpy(p.boxes), x.device)
        ys = torch.arange(x.shape[2], device=x.device)
        xs = torch.arange(x.shape[3], device=x.device)
        in_box = ((ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2]))[:, :, None] & (
            (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4]))[:, None, :]
        lam4 = lam.view(-1, 1, 1, 1)
        mixed = x * lam4 + flipped * (1.0 - lam4)
        pasted = torch.where(in_box[:, None], flipped, x)
        x = torch.where(cutmix.view(-1, 1, 1, 1), pasted, mixed)
        lam2 = lam.view(-1, 1)
        return x, onehot * lam2 + onehot.flip(0) * (1.0 - lam2)


# ---- the whole batch transform ------------------------------------------------------------------

class BatchAugment:
    """RandAugment -> random erasing -> MixUp/CutMix on a global batch, as `data.BatchTransform`.

    Images stay uint8 through RandAugment and leave as 0-255 floats once erased or mixed; with
    MixUp/CutMix configured the targets are always soft (one-hot where nothing was mixed, and
    from `mix_off_epoch` on), so every batch has the same kind of target.
    """

    def __init__(self, aug: AugConfig, num_classes: int, mean: tuple[float, ...],
                 std: tuple[float, ...]):
        self.aug, self.mean, self.std = aug, mean, std
        self.randaugment = (RandAugment(parse_randaugment(aug.randaugment), mean)
                            if aug.randaugment else None)
        self.mixup = Mixup(aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob, aug.switch_prob,
                           aug.mix_mode, num_classes) if aug.mixing else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generators, epoch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x = images
        if self.randaugment is not None:
            x = self.randaugment(x, generators.on_device)
        if self.aug.erasing_prob > 0:
            x = random_erasing(x.float(), self.aug.erasing_prob, self.mean, self.std,
                               generators.on_device)
        if self.mixup is None:
            return x, labels
        n, _, h, w = x.shape
        params = self.mixup.draw(n, h, w, generators.host)
        if self.aug.mix_off_epoch and epoch >= self.aug.mix_off_epoch:
            params = MixParams(np.ones(n), np.zeros(n, bool), np.zeros((n, 4), int))
        return self.mixup.apply(x.float(), labels, params)


def build_batch_transform(aug: AugConfig, num_classes: int, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> BatchAugment | None:
    """The global-batch transform `aug` asks for, or None when every augmentation is off."""
    if not (aug.randaugment or aug.erasing_prob > 0 or aug.mixing):
        return None
    return BatchAugment(aug, num_classes, mean, std)
