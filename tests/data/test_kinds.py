"""data/kinds.py: the registry of dataset kinds and what the rest of the package asks of it."""

import dataclasses
from pathlib import Path

import pytest
import torch

from convnext_cifar.config import DataConfig
from convnext_cifar.data.cifar import CIFAR10, CIFAR100, Cifar
from convnext_cifar.data.kinds import (
    DATASETS,
    ImageFolder,
    kind_of,
    load_dataset,
    normalisation,
    prepare_dataset,
    stored_size,
)
from convnext_cifar.errors import UserError


def test_every_name_has_its_kind_and_cifar10_is_the_default():
    assert list(DATASETS) == ["cifar10", "cifar100", "folder"]
    assert DataConfig().dataset == "cifar10" and kind_of(DataConfig()) is CIFAR10
    assert isinstance(DATASETS["cifar100"], Cifar) and isinstance(DATASETS["folder"], ImageFolder)


def test_size_and_normalisation_come_from_the_kind_unless_given():
    assert stored_size(DataConfig(image_size=64)) == 32  # CIFAR stores 32 px, upsampled later
    assert stored_size(DataConfig(dataset="folder", image_size=64)) == 64
    assert normalisation(DataConfig(dataset="cifar100")) == (CIFAR100.mean, CIFAR100.std)
    given = DataConfig(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert normalisation(given) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    with pytest.raises(UserError, match="no --data.mean/--data.std for its image folder"):
        normalisation(DataConfig(dataset="folder"))


def test_each_kind_refuses_the_options_it_cannot_honour():
    with pytest.raises(UserError, match="invalid --data.labels 'coarse': an image folder's"):
        DataConfig(dataset="folder", labels="coarse")
    with pytest.raises(UserError, match="invalid --data.labels 'coarse': CIFAR-10 has no"):
        DataConfig(labels="coarse")
    with pytest.raises(UserError, match="invalid --data.placement 'disk': CIFAR-10 is read"):
        DataConfig(placement="disk")
    assert DataConfig(dataset="cifar100", labels="coarse").labels == "coarse"


def test_a_run_of_a_folder_is_named_after_the_folder(tmp_path):
    assert ImageFolder().run_label(DataConfig(dataset="folder", root=tmp_path / "pets")) == "pets"
    assert CIFAR10.run_label(DataConfig()) == "cifar10"


def test_load_dataset_places_what_the_kind_read(cifar_root):
    cfg = DataConfig(root=cifar_root, download=False, limit_train=40, limit_val=20)
    prepare_dataset(cfg)  # CIFAR: the files are there, nothing to download
    data = load_dataset(cfg, "cpu")
    assert data.placement == "device" and data.train.images.device == torch.device("cpu")
    assert (len(data.train), len(data.val), data.classes[0]) == (40, 20, "airplane")
    assert load_dataset(dataclasses.replace(cfg, root=Path(cifar_root)), train=False).train is None
