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
command line, where torch is not imported, and hands the parsed policy over
(`AugConfig.randaugment_spec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from convnext_cifar.runtime import to_device

if TYPE_CHECKING:
    from convnext_cifar.config import AugConfig, RandAugmentSpec

# timm's op lists (auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS), same order
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


class BatchPart(NamedTuple):
    """Rows lo:hi of a global batch of n, made from the images of its `rows` (sorted global
    indices): what one process of several augments."""

    n: int
    lo: int
    hi: int
    rows: np.ndarray


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
    img_mean) and resample bicubically (the official recipe's interpolation).

    Which op each image gets is drawn on the host (so each op runs on just the images that
    drew it, with no read from the device); magnitudes and signs on the device. Every draw is
    made for the `n` images of the whole global batch, of which `rows` are the ones given.
    """

    def __init__(self, spec: RandAugmentSpec, fill: tuple[float, float, float]):
        self.spec = spec
        self.ops = RAND_OPS_INCREASING if spec.increasing else RAND_OPS
        self.fill = tuple(float(round(v)) for v in fill)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, host: np.random.Generator,
                 n: int | None = None, rows: np.ndarray | None = None) -> torch.Tensor:
        n, dev, s = n or len(x), x.device, self.spec
        pick = None if rows is None else to_device(torch.from_numpy(rows), dev)
        for _ in range(s.num_layers):
            op = host.integers(0, len(self.ops), n)
            applied = host.random(n) < s.prob
            f64 = {"generator": generator, "device": dev, "dtype": torch.float64}  # as timm
            if s.magnitude_std == math.inf:
                magnitude = torch.rand(n, **f64) * s.magnitude
            elif s.magnitude_std > 0:
                magnitude = s.magnitude + s.magnitude_std * torch.randn(n, **f64)
            else:
                magnitude = torch.full((n,), float(s.magnitude), dtype=torch.float64, device=dev)
            level = magnitude.clamp(0, s.magnitude_max) / 10.0  # timm's _LEVEL_DENOM
            negate = torch.rand(n, generator=generator, device=dev) > 0.5
            op = np.where(applied, op, -1)
            if rows is not None:
                op, level, negate = op[rows], level[pick], negate[pick]
            x = apply_ops(x, op, level, negate, self.ops, self.fill)
        return x


def apply_ops(x: torch.Tensor, op: np.ndarray | torch.Tensor, level: torch.Tensor,
              negate: torch.Tensor, names: tuple[str, ...], fill: tuple[float, float, float]
              ) -> torch.Tensor:
    """Apply op `names[op[i]]` at `level[i]` (magnitude / 10, float64) to image i (op -1: none).

    The images that drew an op are sorted by its kind, so that each kind is one slice: the
    point ops one table lookup, the enhance ops one blend, the geometric ops one resampling,
    each over just its images; an op nobody drew costs nothing. `negate[i]` flips the sign of
    the signed ops (rotate, shear, translate, increasing enhance), as timm's _randomly_negate
    does. `op` is a host array.
    """
    op = np.asarray(op.cpu() if isinstance(op, torch.Tensor) else op)
    kind = np.array([KINDS.index(OP_KIND[n.removesuffix("Increasing")]) for n in names] + [-1])
    order = np.lexsort((op, kind[op]))  # op -1 takes kind[-1]: -1, first
    op_sorted, kind_sorted = op[order], kind[op[order]]
    if (op_sorted < 0).all():  # no image drew an op
        return x
    index = to_device(torch.from_numpy(order), x.device)
    sign = torch.where(negate, -1.0, 1.0)
    xs, level, sign = x[index], level[index], sign[index]
    for k, apply_kind in enumerate((_point_ops, _enhance_ops, _affine_ops)):
        lo, hi = np.searchsorted(kind_sorted, [k, k + 1])
        if hi > lo:
            spans = [(names[o], a - lo, b - lo) for o, a, b in _runs(op_sorted[lo:hi], lo)]
            xs[lo:hi] = apply_kind(xs[lo:hi], spans, level[lo:hi], sign[lo:hi], fill)
    return torch.empty_like(x).index_copy_(0, index, xs)


def _runs(ops: np.ndarray, offset: int) -> list[tuple[int, int, int]]:
    """(op, start, end) of each run of equal ops in a sorted array, offset."""
    starts = np.flatnonzero(np.diff(np.concatenate([[-2], ops]))) if len(ops) else []
    ends = list(starts[1:]) + [len(ops)]
    return [(int(ops[a]), offset + int(a), offset + int(b)) for a, b in zip(starts, ends)]


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _point_ops(x, spans, level, sign, fill):
    """Every per-pixel-value op of these images as one lookup: each image's table per channel
    (the identity, then its op's)."""
    n, c = x.shape[:2]
    values = torch.arange(256, device=x.device)
    lut = values.repeat(n, c, 1)
    for name, a, b in spans:
        lut[a:b] = POINT_TABLES[name.removesuffix("Increasing")](
            x[a:b], level[a:b].double()[:, None, None], name.endswith("Increasing"), values)
    return lut.gather(2, x.reshape(n, c, -1).long()).to(torch.uint8).view_as(x)


def _posterize_table(x, lvl, increasing, values):
    bits = (lvl * 4).floor().long()  # timm: int(level * 4) bits kept
    bits = 4 - bits if increasing else bits
    mask = ~((1 << (8 - bits.clamp(0, 8))) - 1)
    return torch.where(bits >= 8, values, values & mask).expand(len(x), x.shape[1], 256)


def _solarize_table(x, lvl, increasing, values):
    thresh = (lvl * 256).floor().clamp(max=256).long()  # timm: min(256, int(l * 256))
    thresh = 256 - thresh if increasing else thresh
    return torch.where(values < thresh, values, 255 - values).expand(len(x), x.shape[1], 256)


def _solarize_add_table(x, lvl, increasing, values):
    """Brighten the dark half by level * 110 (at most 128)."""
    add = (lvl * 110).floor().clamp(max=128).long()
    table = torch.where(values < 128, (values + add).clamp(max=255), values)
    return table.expand(len(x), x.shape[1], 256)


POINT_TABLES = {
    "AutoContrast": lambda x, lvl, inc, values: _autocontrast_lut(x),
    "Equalize": lambda x, lvl, inc, values: _equalize_lut(x),
    "Invert": lambda x, lvl, inc, values: (255 - values).expand(len(x), x.shape[1], 256),
    "Posterize": _posterize_table, "Solarize": _solarize_table,
    "SolarizeAdd": _solarize_add_table,
}


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(N, C, 256) counts of each value per image and channel (scatter_add: unlike bincount,
    no read of the maximum on a GPU)."""
    n, c = x.shape[:2]
    offsets = (torch.arange(n * c, device=x.device) * 256).view(n, c, 1)
    flat = (x.reshape(n, c, -1).long() + offsets).reshape(-1)
    counts = torch.zeros(n * c * 256, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(n, c, 256)


def _autocontrast_lut(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast table (no cutoff)."""
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


def _enhance_ops(x, spans, level, sign, fill):
    """PIL's ImageEnhance (Color, Contrast, Brightness, Sharpness) of these images as one blend:
    degenerate + factor * (image - degenerate), clipped and truncated to uint8 as PIL's."""
    img = x.float()
    degenerate = torch.empty_like(img)
    factor = torch.empty_like(level)
    for name, a, b in spans:
        if name.endswith("Increasing"):  # timm: max(0.1, 1 + random sign * level * 0.9)
            factor[a:b] = (1.0 + sign[a:b] * level[a:b] * 0.9).clamp(min=0.1)
        else:
            factor[a:b] = level[a:b] * 1.8 + 0.1
        degenerate[a:b] = DEGENERATE[name.removesuffix("Increasing")](x[a:b], img[a:b])
    out = (degenerate + _per_image(factor) * (img - degenerate)).clamp(0, 255)
    return out.to(torch.uint8)


DEGENERATE = {
    "Color": lambda x, img: _luma(x).expand_as(img),
    "Contrast": lambda x, img: (_luma(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
    .expand_as(img),
    "Brightness": lambda x, img: torch.zeros_like(img),
    "Sharpness": lambda x, img: _smooth(img),
}


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as float (N, 1, H, W)."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, 13ths), rounded; the border stays as it was."""
    kernel = torch.ones(3, 3, device=img.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(img.shape[1], 1, 3, 3)
    # the images that drew the op vary in number every batch: cuDNN's autotuning would benchmark
    # each new count again (a few ms each), for a 3x3 blur whose algorithm does not matter
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        inner = F.conv2d(img, kernel, groups=img.shape[1]).round()
    finally:
        torch.backends.cudnn.benchmark = autotune
    out = img.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _affine_ops(x, spans, level, sign, fill):
    """Rotate, shear and translate of these images as one resampling: each its own affine map
    (PIL's convention: output pixel centre -> input point), bicubic, filled outside."""
    n, _, h, w = x.shape
    m = torch.eye(3, device=x.device).repeat(n, 1, 1)
    for name, a, b in spans:
        AFFINE[name](m[a:b], sign[a:b] * level[a:b], h, w)
    # pixel coordinates (centres at i + 0.5) -> affine_grid's [-1, 1] (align_corners=False)
    to_norm, to_pix = torch.eye(3, device=x.device), torch.eye(3, device=x.device)
    to_norm[0, 0], to_norm[1, 1], to_norm[:2, 2] = 2.0 / w, 2.0 / h, -1.0
    to_pix[0, 0], to_pix[1, 1], to_pix[0, 2], to_pix[1, 2] = w / 2, h / 2, w / 2, h / 2
    theta = (to_norm @ m @ to_pix)[:, :2]
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    sampled = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border",
                            align_corners=False)
    inside = (grid.abs() <= 1).all(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    colour = _channel_values(fill, x.device)
    return torch.where(inside, sampled.round().clamp(0, 255), colour).to(torch.uint8)


def _rotate(m, signed, h, w):  # counter-clockwise by level * 30 degrees about the centre
    angle = torch.deg2rad(signed * 30.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    cx, cy = w / 2.0, h / 2.0
    m[:, 0, 2] = cx - cos * cx + sin * cy
    m[:, 1, 2] = cy - sin * cx - cos * cy


def _shear_x(m, signed, h, w):
    m[:, 0, 1] = signed * 0.3


def _shear_y(m, signed, h, w):
    m[:, 1, 0] = signed * 0.3


def _translate_x(m, signed, h, w):  # timm's translate_pct 0.45 of the width
    m[:, 0, 2] = signed * 0.45 * w


def _translate_y(m, signed, h, w):
    m[:, 1, 2] = signed * 0.45 * h


AFFINE = {"Rotate": _rotate, "ShearX": _shear_x, "ShearY": _shear_y,
          "TranslateXRel": _translate_x, "TranslateYRel": _translate_y}
KINDS = ("point", "enhance", "affine")
OP_KIND = {**{name: "point" for name in POINT_TABLES},
           **{name: "enhance" for name in DEGENERATE}, **{name: "affine" for name in AFFINE}}


# ---- random erasing -----------------------------------------------------------------------------

def random_erasing(x: torch.Tensor, prob: float, mean: tuple[float, ...], std: tuple[float, ...],
                   generator: torch.Generator, attempts: int = 10, n: int | None = None,
                   rows: np.ndarray | None = None) -> torch.Tensor:
    """timm's RandomErasing ('pixel' mode, one box) on a float batch in 0-255 pixel space.

    Per image with probability `prob`: up to 10 tries of an area in [0.02, 1/3] of the image and
    an aspect ratio log-uniform in [0.3, 1/0.3]; the first box that fits is filled with per-pixel
    normal noise, which after normalisation is N(0, 1) as timm draws it after its Normalize.
    Every draw is made for the `n` images of the whole global batch, of which `rows` are given.
    """
    _, c, h, w = x.shape
    n, dev = n or len(x), x.device

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
    rows_in = (ys >= top[:, None]) & (ys < (top + bh)[:, None])
    cols = (xs >= left[:, None]) & (xs < (left + bw)[:, None])
    box = rows_in[:, :, None] & cols[:, None, :] & (erase & fits.any(1))[:, None, None]
    noise = torch.randn((n, c, h, w), generator=generator, device=dev)
    if rows is not None:
        pick = to_device(torch.from_numpy(rows), dev)
        box, noise = box[pick], noise[pick]
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

    def apply(self, x: torch.Tensor, labels: torch.Tensor, p: MixParams,
              part: BatchPart | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a float batch and make its soft targets (N, classes). With `part`, `x` holds the
        rows `part.rows` of the global batch, and rows lo:hi come out (each mixed with its
        partner N-1-i, which the rows include)."""
        if part is None:
            own, flipped, onehot_flipped = x, x.flip(0), F.one_hot(labels.flip(0), self.num_classes)
            lo, hi = 0, len(x)
        else:
            where = np.empty(part.n, dtype=np.int64)
            where[part.rows] = np.arange(len(part.rows))
            mine = np.arange(part.lo, part.hi)
            pick = to_device(torch.from_numpy(np.stack([where[mine], where[part.n - 1 - mine]])),
                             x.device)
            own, flipped = x[pick[0]], x[pick[1]]
            onehot_flipped = F.one_hot(labels[pick[1]], self.num_classes)
            labels, (lo, hi) = labels[pick[0]], (part.lo, part.hi)
        x, onehot = own, F.one_hot(labels, self.num_classes).to(own.dtype)
        onehot_flipped = onehot_flipped.to(own.dtype)
        if p.per_batch:  # one lambda and one box: plain slicing, no host values on the device
            lam = float(p.lam[0])
            if p.cutmix[0]:
                yl, yh, xl, xh = (int(v) for v in p.boxes[0])
                x = x.clone()
                x[:, :, yl:yh, xl:xh] = flipped[:, :, yl:yh, xl:xh]
            elif lam != 1.0:
                x = x * lam + flipped * (1.0 - lam)
            return x, onehot * lam + onehot_flipped * (1.0 - lam)
        lam = to_device(torch.from_numpy(p.lam[lo:hi].astype(np.float32)), x.device)
        cutmix = to_device(torch.from_numpy(p.cutmix[lo:hi]), x.device)
        boxes = to_device(torch.from_numpy(p.boxes[lo:hi]), x.device)
        ys = torch.arange(x.shape[2], device=x.device)
        xs = torch.arange(x.shape[3], device=x.device)
        in_box = ((ys >= boxes[:, 0:1]) & (ys < boxes[:, 1:2]))[:, :, None] & (
            (xs >= boxes[:, 2:3]) & (xs < boxes[:, 3:4]))[:, None, :]
        lam4 = lam.view(-1, 1, 1, 1)
        mixed = x * lam4 + flipped * (1.0 - lam4)
        pasted = torch.where(in_box[:, None], flipped, x)
        x = torch.where(cutmix.view(-1, 1, 1, 1), pasted, mixed)
        lam2 = lam.view(-1, 1)
        return x, onehot * lam2 + onehot_flipped * (1.0 - lam2)


# ---- the whole batch transform ------------------------------------------------------------------

class BatchAugment:
    """RandAugment -> random erasing -> MixUp/CutMix on a global batch, as `loader.BatchTransform`.

    Images stay uint8 through RandAugment and leave as 0-255 floats once erased or mixed; with
    MixUp/CutMix configured the targets are always soft (one-hot where nothing was mixed, and
    from `mix_off_epoch` on), so every batch has the same kind of target.
    """

    def __init__(self, aug: AugConfig, num_classes: int, mean: tuple[float, ...],
                 std: tuple[float, ...]):
        self.aug, self.mean, self.std = aug, mean, std
        self.randaugment = (RandAugment(aug.randaugment_spec, mean)
                            if aug.randaugment else None)
        self.mixup = Mixup(aug.mixup_alpha, aug.cutmix_alpha, aug.mix_prob, aug.switch_prob,
                           aug.mix_mode, num_classes) if aug.mixing else None

    def rows(self, n: int, lo: int, hi: int) -> np.ndarray:
        """The rows of a global batch of n that rows lo:hi need: themselves, and with MixUp/CutMix
        their partners N-1-i."""
        mine = np.arange(lo, hi)
        return mine if self.mixup is None else np.union1d(mine, n - 1 - mine)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generators, epoch: int,
                 part: BatchPart | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole global batch transformed; or with `part`, rows lo:hi of it from the rows
        `part.rows` given, every draw made for the whole batch (N processes == 1 process)."""
        n = len(images) if part is None else part.n
        rows = None if part is None else part.rows
        x = images
        if self.randaugment is not None:
            x = self.randaugment(x, generators.on_device, generators.host, n, rows)
        if self.aug.erasing_prob > 0:
            x = random_erasing(x.float(), self.aug.erasing_prob, self.mean, self.std,
                               generators.on_device, n=n, rows=rows)
        if self.mixup is None:
            return x, labels
        _, _, h, w = x.shape
        params = self.mixup.draw(n, h, w, generators.host)
        if self.aug.mix_off_epoch and epoch >= self.aug.mix_off_epoch:
            params = MixParams(np.ones(n), np.zeros(n, bool), np.zeros((n, 4), int))
        return self.mixup.apply(x.float(), labels, params, part)


def build_batch_transform(aug: AugConfig, num_classes: int, mean: tuple[float, ...],
                          std: tuple[float, ...]) -> BatchAugment | None:
    """The global-batch transform `aug` asks for, or None when every augmentation is off."""
    if not (aug.randaugment or aug.erasing_prob > 0 or aug.mixing):
        return None
    return BatchAugment(aug, num_classes, mean, std)
