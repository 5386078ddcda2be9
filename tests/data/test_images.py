"""data/images.py: every format and mode becomes RGB as Pillow reads it, resize modes, EXIF
orientation, decompression bombs refused."""


import numpy as np
import pytest
import torch
from PIL import Image
from support import png_claiming, save_sideways

from convnext_cifar.data import images as data_images
from convnext_cifar.data.images import decode_rgb, read_image


def rgb_image(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) % 256], -1).astype(np.uint8)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name, save", [
    ("rgb.png", lambda a, p: Image.fromarray(a).save(p)),
    ("gray.png", lambda a, p: Image.fromarray(a).convert("L").save(p)),
    ("palette.png", lambda a, p: Image.fromarray(a).convert("P").save(p)),
    ("rgba.png", lambda a, p: Image.fromarray(a).convert("RGBA").save(p)),
    ("rgb.bmp", lambda a, p: Image.fromarray(a).save(p)),
    ("rgb.webp", lambda a, p: Image.fromarray(a).save(p, lossless=True)),
    ("rgb.gif", lambda a, p: Image.fromarray(a).convert("P").save(
        p, save_all=True, append_images=[Image.new("P", a.shape[1::-1])])),  # 2 frames
    ("rgb.jpg", lambda a, p: Image.fromarray(a).save(p, quality=95)),
    ("gray.jpeg", lambda a, p: Image.fromarray(a).convert("L").save(p)),
    ("cmyk.jpg", lambda a, p: Image.fromarray(a).convert("CMYK").save(p)),
])
def test_every_format_and_mode_becomes_rgb_like_pillow_reads_it(tmp_path, name, save):
    array = rgb_image()
    path = tmp_path / name
    save(array, path)
    with Image.open(path) as img:
        img.seek(0)
        want = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    got = data_images.decode_rgb(path)
    assert got.dtype == torch.uint8 and got.shape == (3, 30, 40)
    lossy = name.endswith((".jpg", ".jpeg"))  # decoders may differ by a level or two
    assert (got.int() - want.int()).abs().max() <= (3 if lossy else 0), name
    assert read_image(path, 32, "center-crop").shape == (3, 32, 32)


def test_resize_modes():
    wide = torch.zeros(3, 32, 64, dtype=torch.uint8)
    wide[:, :, :16] = 255  # a white band on the left quarter
    crop = data_images.resize(wide, 32, "center-crop")  # 32 x 64 -> keeps the middle 32 columns
    squash = data_images.resize(wide, 32, "squash")  # -> both sides to 32: the band is 8 wide
    assert crop.shape == squash.shape == (3, 32, 32)
    assert crop.float().mean() < 5 and 50 < squash.float().mean() < 80
    same = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(data_images.resize(same, 32, "center-crop"), same)


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    import torchvision.io

    monkeypatch.setattr(torchvision.io, "decode_image",
                        lambda *a, **k: pytest.fail("decoded a bomb"))
    with pytest.raises(data_images.BadImage,
                       match="100000 x 100000 pixels.*refused before decoding"):
        data_images.decode_rgb(bomb)


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    extra = {"lossless": True} if suffix == ".webp" else {}
    save_sideways(tmp_path / f"turned{suffix}", upright, **extra)
    plain, turned = decode_rgb(tmp_path / "plain.png"), decode_rgb(tmp_path / f"turned{suffix}")
    assert turned.shape == plain.shape == (3, 24, 40)
    assert (turned == plain).all()


def test_pillows_own_pixel_limit_stays_on(tmp_path):
    from PIL import Image as PILImage

    from convnext_cifar.data.images import image_size, read_image

    before = PILImage.MAX_IMAGE_PIXELS
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    assert image_size(tmp_path / "x.png") == (40, 30)
    read_image(tmp_path / "x.png", 32, "squash")
    assert PILImage.MAX_IMAGE_PIXELS == before is not None


def test_decoding_in_this_process_leaves_torch_its_threads(tmp_path):
    """One worker (or one chunk) decodes here: the run that follows must not train on the one
    thread a decoding worker process uses."""
    from convnext_cifar.data.images import decode_chunks

    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(path)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        list(decode_chunks([path], 8, "squash", workers=1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
