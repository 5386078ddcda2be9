"""Write CIFAR-10 in its on-disk python layout, the way the official files really are.

The official batches were pickled by Python 2 (protocol 2): their strings are Python 2 `str`
(SHORT_BINSTRING/BINSTRING opcodes, i.e. bytes) and the arrays point at numpy.core.multiarray.
`Py2Pickler` writes exactly those opcodes, so the reader is tested on what users have on disk.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")


class Py2Pickler(pickle._Pickler):
    """Protocol-2 pickles as Python 2's cPickle wrote them (str as byte strings)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def dump_py3(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def learnable_images(n: int, seed: int, num_classes: int = 10, label: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class shows in colour and in a stripe pattern: a small net learns it fast.
    Classes are drawn at random, or all `label`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n) if label is None else np.full(n, label)
    palette = np.random.default_rng(1234).integers(30, 226, (num_classes, 3))
    base = palette[labels][:, :, None, None].astype(np.float32)
    stripes = (np.arange(32)[None, :] // (1 + labels[:, None] % 4)) % 2  # (n, 32)
    pattern = np.where(labels[:, None, None] >= 5, stripes[:, :, None], stripes[:, None, :])
    images = base + 40 * (pattern[:, None] - 0.5) + rng.normal(0, 20, (n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_cifar10(root: Path, train, test, dump=dump_py2, classes=CLASSES) -> Path:
    """Write (images uint8 (N,3,32,32), labels) splits as cifar-10-batches-py/ under `root`."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[0])), len(TRAIN_FILES))
    for name, idx in zip(TRAIN_FILES, chunks):
        _write_batch(folder / name, train[0][idx], train[1][idx], name, dump)
    _write_batch(folder / "test_batch", test[0], test[1], "testing batch 1 of 1", dump)
    dump({"label_names": list(classes), "num_cases_per_batch": len(chunks[0]), "num_vis": 3072},
         folder / "batches.meta")
    return folder


def _write_batch(path: Path, images, labels, name: str, dump) -> None:
    dump({"batch_label": name, "labels": [int(v) for v in labels],
          "data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8),
          "filenames": [f"img_{i}.png" for i in range(len(images))]}, path)


def write_cifar100(root: Path, train, test, dump=dump_py2, fine_names=None, coarse_names=None
                   ) -> Path:
    """Write (images, fine labels) splits as cifar-100-python/ (train, test, meta) under
    `root`, the official layout: one pickle per split with fine_labels and coarse_labels
    (coarse = fine // 5 here), and meta with both name lists."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine_names = fine_names or [f"fine_{i:02d}" for i in range(100)]
    coarse_names = coarse_names or [f"coarse_{i:02d}" for i in range(20)]
    for name, (images, labels) in (("train", train), ("test", test)):
        dump({"filenames": [f"img_{i}.png" for i in range(len(images))],
              "batch_label": f"{name}ing batch 1 of 1",
              "fine_labels": [int(v) for v in labels],
              "coarse_labels": [int(v) // 5 for v in labels],
              "data": np.ascontiguousarray(images.reshape(len(images), -1), dtype=np.uint8)},
             folder / name)
    dump({"fine_label_names": list(fine_names), "coarse_label_names": list(coarse_names)},
         folder / "meta")
    return folder


def write_image_folder(root: Path, split_counts: dict, size=32, seed=0, suffix=".png") -> Path:
    """root/<split>/<class>/<i><suffix> with learnable images: {split: {class: count}}."""
    from PIL import Image

    classes = sorted({c for counts in split_counts.values() for c in counts})
    for split, counts in split_counts.items():
        for cls, count in counts.items():
            label = classes.index(cls)
            images, _ = learnable_images(count, seed=seed + 17 * label + (split == "val"),
                                         num_classes=max(len(classes), 10), label=label)
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                hwc = np.transpose(img, (1, 2, 0))
                if size != 32:
                    hwc = np.asarray(Image.fromarray(hwc).resize((size, size)))
                Image.fromarray(hwc).save(folder / f"{i:04d}{suffix}")
    return Path(root)
