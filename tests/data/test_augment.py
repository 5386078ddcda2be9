"""data/augment.py: crop/flip, RandAugment, erasing and MixUp/CutMix against timm, batched,
and the same on every rank."""


import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import mixup as timm_mixup

from convnext_cifar.config import AugConfig, DataConfig, parse_randaugment
from convnext_cifar.data import augment as data_augment
from convnext_cifar.data.augment import (
    RAND_OPS,
    RAND_OPS_INCREASING,
    BatchAugment,
    Mixup,
    RandAugment,
    apply_ops,
    crop_flip,
    random_erasing,
)
from convnext_cifar.data.loader import DeviceLoader, Generators, Normalize
from convnext_cifar.distributed import Dist

FILL = (125, 123, 114)


def images(n=6, seed=0, size=32):
    """Smooth, structured images (gradients, a bright square, noise) with varied ranges."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for i in range(n):
        lo, hi = 20 + 10 * (i % 8), 200 + 5 * (i % 8)
        base = lo + (hi - lo) * (xs + ys * (i % 3)) / (size * (1 + i % 3))
        img = torch.stack([base, base.flip(0), base.flip(1)]).float()
        img[:, 8:16, 10:20] += 40
        img += torch.randn(img.shape, generator=g) * 8
        out.append(img.clamp(0, 255))
    return torch.stack(out).round().to(torch.uint8)


def to_pil(img):
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(pil):
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


def timm_op(img, name, magnitude, negate, monkeypatch):
    """timm's RandAugment op `name` on one image at `magnitude` with a fixed sign."""
    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v: -v if negate else v)
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, {"translate_pct": 0.45}) if level_fn else ()
    kwargs = {"fillcolor": FILL, "resample": Image.BICUBIC}
    return from_pil(timm_aa.NAME_TO_OP[name](to_pil(img), *args, **kwargs))


def ours(x, name, magnitude, negate):
    names = tuple(dict.fromkeys(RAND_OPS + RAND_OPS_INCREASING))
    n = len(x)
    level = torch.full((n,), magnitude / 10, dtype=torch.float64)
    return apply_ops(x, torch.full((n,), names.index(name)), level, torch.full((n,), negate),
                     names, FILL)


EXACT = ["AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
         "SolarizeIncreasing", "SolarizeAdd"]


ENHANCE = ["Color", "ColorIncreasing", "Contrast", "ContrastIncreasing", "Brightness",
           "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing"]


AFFINE = ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


class QueueRandom:
    """Stands in for numpy.random inside timm's mixup: randint answers from a queue."""

    def __init__(self, values):
        self.values = list(values)

    def randint(self, low, high=None, size=None):
        return self.values.pop(0)


def timm_mix(monkeypatch, mode, lam, cutmix, cy, cx, x, labels, smoothing=0.0):
    """timm's Mixup on (x, labels) with its per-batch/pair/element draws replaced by ours."""
    mix = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode=mode,
                           label_smoothing=smoothing, num_classes=10)
    if mode == "batch":
        monkeypatch.setattr(mix, "_params_per_batch", lambda: (float(lam[0]), bool(cutmix[0])))
        centers = [cy[0], cx[0]] if cutmix[0] and lam[0] != 1 else []
    else:
        monkeypatch.setattr(mix, "_params_per_elem",
                            lambda count: (lam.astype(np.float32).copy(), cutmix.copy()))
        centers = [v for i in range(len(lam)) if cutmix[i] and lam[i] != 1
                   for v in (cy[i], cx[i])]
    monkeypatch.setattr(timm_mixup.np, "random", QueueRandom(centers))
    return mix(x.clone(), labels.clone())


def _reference_crop_flip(images, padding, offsets, flips):
    """Per-image torchvision-style RandomCrop(32, padding) + flip, for comparison."""
    out = []
    for img, (oy, ox), f in zip(images, offsets.tolist(), flips.tolist()):
        p = torch.nn.functional.pad(img, (padding,) * 4)
        crop = p[:, oy:oy + 32, ox:ox + 32]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("magnitude", [0.0, 3.0, 9.0, 10.0])
def test_point_ops_equal_timm_pixel_for_pixel(name, magnitude, monkeypatch):
    x = images()
    got = ours(x, name, magnitude, False)
    for i in range(len(x)):
        try:
            want = timm_op(x[i], name, magnitude, False, monkeypatch)
        except ValueError as e:  # Pillow >= 10 refuses to posterize to 0 bits; timm passes 0
            assert "bits" in str(e) and name.startswith("Posterize")
            assert (got[i] == 0).all()  # 0 bits kept: black, as TF's RandAugment has it
            continue
        assert torch.equal(got[i], want), i


@pytest.mark.parametrize("name", ENHANCE)
@pytest.mark.parametrize("magnitude, negate", [(2.0, False), (9.0, True), (9.0, False)])
def test_enhance_ops_match_timm_within_one_level(name, magnitude, negate, monkeypatch):
    x = images()
    got = ours(x, name, magnitude, negate)
    for i in range(len(x)):
        want = timm_op(x[i], name, magnitude, negate, monkeypatch)
        assert (got[i].int() - want.int()).abs().max() <= 1, i


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("negate", [False, True])
def test_geometric_ops_match_timm_up_to_interpolation(name, negate, monkeypatch):
    x = images()
    got = ours(x, name, 9.0, negate)
    for i in range(len(x)):
        want = timm_op(x[i], name, 9.0, negate, monkeypatch)
        diff = (got[i].int() - want.int()).abs().float()
        assert diff.mean() < 4.0 and (diff > 24).float().mean() < 0.03, (i, diff.mean())
        moved = (want.int() - x[i].int()).abs().float().mean()
        assert moved > 4 * diff.mean()  # the op did something large, and the same thing


def test_integer_translation_is_exact(monkeypatch):
    x = images()
    magnitude = 4 / (0.45 * 32) * 10  # a 4-pixel shift
    got = ours(x, "TranslateXRel", magnitude, False)
    for i in range(len(x)):
        assert torch.equal(got[i], timm_op(x[i], "TranslateXRel", magnitude, False, monkeypatch))


def test_randaugment_draws_per_image_and_is_reproducible():
    x = images(64, seed=1)
    spec = parse_randaugment("rand-m9-mstd0.5-inc1")
    ra = RandAugment(spec, FILL)
    a = ra(x, torch.Generator().manual_seed(5), np.random.default_rng(5))
    b = ra(x, torch.Generator().manual_seed(5), np.random.default_rng(5))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    changed = (a != x).flatten(1).any(1).float().mean()
    assert 0.5 < changed < 1.0  # each of 2 layers applies with p 0.5: ~75 % of images change
    never = RandAugment(parse_randaugment("rand-m9-p0"), FILL)
    assert torch.equal(never(x, torch.Generator().manual_seed(0), np.random.default_rng(0)), x)
    always = RandAugment(parse_randaugment("rand-m9-n1-p1"), FILL)(x, torch.Generator(),
                                                                  np.random.default_rng(0))
    assert (always != x).flatten(1).any(1).float().mean() > 0.9


def test_random_erasing_statistics():
    n, prob = 4000, 0.25
    mean, std = (125.3, 123.0, 113.9), (51.6, 50.8, 51.3)
    x = torch.full((n, 3, 32, 32), -1000.0)  # a value erasing noise never takes
    out = random_erasing(x, prob, mean, std, torch.Generator().manual_seed(0))
    erased = out[:, 0] != -1000
    fraction = erased.flatten(1).any(1).float().mean().item()
    assert abs(fraction - prob) < 0.03
    area = erased.flatten(1).sum(1).float()
    area = area[area > 0] / (32 * 32)
    assert area.min() >= 0.015 and area.max() <= 0.36  # [0.02, 1/3], to the pixel
    rows = erased.any(2).sum(1)[erased.flatten(1).any(1)]
    cols = erased.any(1).sum(1)[erased.flatten(1).any(1)]
    assert ((rows * cols).float() / (32 * 32) == area).all()  # one rectangle per image
    values = (out - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    normal = values[erased[:, None].expand_as(values)]
    assert abs(normal.mean()) < 0.02 and abs(normal.std() - 1) < 0.02  # N(0, 1) once normalised


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("seed", range(4))
def test_mixing_equals_timm_for_the_same_lambda_and_box(mode, seed, monkeypatch):
    n, h, w = 8, 32, 32
    rng = np.random.default_rng(seed)
    count = {"batch": 1, "pair": n // 2, "elem": n}[mode]
    lam = np.where(rng.random(count) < 0.8, rng.beta(1.0, 1.0, count), 1.0)
    cutmix = rng.random(count) < 0.5
    cy, cx = rng.integers(0, h, count), rng.integers(0, w, count)
    x = torch.randn(n, 3, h, w)
    labels = torch.from_numpy(rng.integers(0, 10, n))
    want_x, want_t = timm_mix(monkeypatch, mode, lam, cutmix, cy, cx, x, labels)
    mixer = Mixup(0.8, 1.0, 1.0, 0.5, mode, 10)
    params = mixer.params(lam, cutmix, cy, cx, n, h, w)
    got_x, got_t = mixer.apply(x, labels, params)
    assert torch.equal(got_x, want_x)
    assert torch.equal(got_t, want_t)


def test_label_smoothing_in_the_loss_equals_timms_smoothed_targets(monkeypatch):
    n = 8
    lam, cutmix = np.array([0.3]), np.array([False])
    x, labels = torch.randn(n, 3, 32, 32), torch.arange(n) % 10
    _, timm_target = timm_mix(monkeypatch, "batch", lam, cutmix, [0], [0], x, labels, 0.1)
    _, ours_target = Mixup(0.8, 0.0, 1.0, 0.5, "batch", 10).apply(
        x, labels, Mixup(0.8, 0.0, 1.0, 0.5, "batch", 10).params(lam, cutmix, [0], [0], n, 32, 32))
    logits = torch.randn(n, 10)
    timm_loss = (-timm_target * logits.log_softmax(1)).sum()
    ours = torch.nn.functional.cross_entropy(logits, ours_target, label_smoothing=0.1,
                                             reduction="sum")
    torch.testing.assert_close(ours, timm_loss)


def test_mixing_draws_follow_the_options():
    rng = np.random.default_rng(0)
    both = Mixup(0.8, 1.0, 0.5, 0.25, "elem", 10)
    p = both.draw(20000, 32, 32, rng)
    mixed = p.lam != 1
    assert abs(mixed.mean() - 0.5) < 0.02  # mix_prob
    assert abs(p.cutmix[mixed].mean() - 0.25) < 0.02  # switch_prob
    assert abs(p.lam[mixed & ~p.cutmix].mean() - 0.5) < 0.02  # Beta(0.8, 0.8) is symmetric
    area = (p.boxes[:, 1] - p.boxes[:, 0]) * (p.boxes[:, 3] - p.boxes[:, 2])
    assert np.allclose(p.lam[p.cutmix], 1 - area[p.cutmix] / 1024)  # corrected to the box
    batch = Mixup(0.0, 1.0, 1.0, 0.5, "batch", 10).draw(16, 32, 32, rng)
    assert batch.per_batch and batch.cutmix.all()
    pair = Mixup(0.8, 0.0, 1.0, 0.5, "pair", 10).draw(7, 32, 32, rng)
    assert np.array_equal(pair.lam, pair.lam[::-1]) and pair.lam[3] == 1  # odd middle kept


def test_batch_augment_turns_off_mixing_from_the_off_epoch_and_keeps_soft_targets():
    aug = AugConfig(mixup_alpha=0.8, mix_off_epoch=2)
    transform = BatchAugment(aug, 10, FILL, (50.0, 50.0, 50.0))
    x, labels = images(8).float(), torch.arange(8)
    gens = Generators(torch.device("cpu"))
    gens.seed(0, 1)
    mixed_x, soft = transform(x.to(torch.uint8), labels, gens, epoch=1)
    assert soft.shape == (8, 10) and not torch.equal(mixed_x, x)
    plain_x, onehot = transform(x.to(torch.uint8), labels, gens, epoch=2)
    assert torch.equal(plain_x, x) and torch.equal(onehot, torch.eye(10)[labels])


def test_each_op_runs_once_on_just_the_images_that_drew_it(monkeypatch):

    calls = []
    for table in (data_augment.POINT_TABLES, data_augment.DEGENERATE, data_augment.AFFINE):
        for name, op in list(table.items()):
            monkeypatch.setitem(table, name, lambda x, *a, op=op, name=name: calls.append(
                (name, len(x))) or op(x, *a))
    spec = parse_randaugment("rand-m9-n2-p0.5-inc1")
    x = images(64, seed=3)
    RandAugment(spec, FILL)(x, torch.Generator().manual_seed(0), np.random.default_rng(7))
    host = np.random.default_rng(7)  # the same host draws, made again
    drawn = []
    for _ in range(2):
        op, applied = host.integers(0, 15, 64), host.random(64) < 0.5
        drawn += np.unique(op[applied], return_counts=True)[1].tolist()
    assert sorted(n for _, n in calls) == sorted(drawn)  # each drawn op once, on its images
    assert len(calls) < 2 * 15


@pytest.mark.parametrize("aug", [
    AugConfig(randaugment="rand-m9-mstd0.5-inc1", erasing_prob=0.5),  # a rank's own rows only
    AugConfig(randaugment="rand-m9-mstd0.5-inc1", erasing_prob=0.25, mixup_alpha=0.8,
              cutmix_alpha=1.0, mix_mode="elem"),  # its rows and their mixing partners
])
def test_ranks_augment_their_slice_as_one_process_augments_the_batch(aug):
    from convnext_cifar.data.augment import build_batch_transform

    imgs, labels = images(48, seed=4), torch.arange(48) % 10
    cfg = DataConfig(batch_size=24)

    def loader(dist):
        transform = build_batch_transform(aug, 10, FILL, (50.0, 50.0, 50.0))
        if dist.world > 1:  # the rows each rank asked for: fewer than the whole batch
            assert len(transform.rows(24, *dist.shard(24))) < 24
        normalize = Normalize(FILL, (50.0, 50.0, 50.0), 32, "cpu", False)
        return DeviceLoader(imgs, labels, cfg, 5, normalize, dist, transform)

    whole = list(loader(Dist()).epoch(1))
    parts = [list(loader(Dist(r, 4)).epoch(1)) for r in range(4)]
    for i, (x, y, _) in enumerate(whole):
        torch.testing.assert_close(torch.cat([p[i][0] for p in parts]), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.cat([p[i][1] for p in parts]).float(), y.float())


def test_crop_flip_matches_per_image_reference_and_shows_zero_border():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # no zero pixels
    g = torch.Generator().manual_seed(3)
    out = crop_flip(images, 4, 0.5, g)
    g.manual_seed(3)  # the same draws, in the same order
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _reference_crop_flip(images, 4, offsets, flips))
    for i in range(64):  # zero rows/columns exactly where the offset reaches into the padding
        oy, ox = offsets[i].tolist()
        zero_rows = (out[i] == 0).all(dim=0).all(dim=1).sum().item()
        zero_cols = (out[i] == 0).all(dim=0).all(dim=0).sum().item()
        assert zero_rows == abs(oy - 4) and zero_cols == abs(ox - 4)
    assert 0 < flips.sum() < 64 and len({tuple(o) for o in offsets.tolist()}) > 20


def test_flip_is_exact_and_probability_is_respected():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(crop_flip(images, 0, 1.0, g), images.flip(-1))
    assert torch.equal(crop_flip(images, 0, 0.0, g), images)


def test_the_sharpness_blur_never_autotunes_cudnn(monkeypatch):
    """Its batch size changes every call: autotuning would benchmark each new size again."""
    seen, real = [], torch.nn.functional.conv2d

    def conv2d(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    images = torch.randint(0, 256, (3, 3, 8, 8)).float()
    data_augment._smooth(images)
    assert seen == [False] and torch.backends.cudnn.benchmark  # off inside, as it was after
