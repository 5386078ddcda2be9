"""data/dataset.py: what every kind produces, and the identity that tells whether two datasets
are the same data."""

import pytest

from convnext_cifar.data.dataset import (
    Dataset,
    DatasetKind,
    Split,
    class_difference,
    identity_difference,
    identity_of,
)


def test_the_identity_follows_the_files_not_where_they_are():
    a = identity_of(["cat", "dog"], ["train/cat/1.png"], ["val/cat/2.png"])
    assert a == identity_of(["cat", "dog"], ["train/cat/1.png"], ["val/cat/2.png"])
    assert a["classes"] == ["cat", "dog"] and len(a["train"]) == len(a["val"]) == 16
    assert identity_of(["cat", "dog"], None, ["val/cat/2.png"])["train"] is None


def test_what_differs_between_two_identities_is_said_in_words():
    old = identity_of(["cat", "dog"], ["t1"], ["v1"])
    assert identity_difference(old, old) == ""
    assert identity_difference(old, identity_of(["cat", "eel"], ["t1"], ["v1"])) == (
        "classes missing: dog; classes not in the run: eel")
    assert identity_difference(old, identity_of(["dog", "cat"], ["t1"], ["v1"])) == (
        "the same class names in another order")
    moved = identity_of(["cat", "dog"], ["t2"], ["v1"])
    assert identity_difference(old, moved) == (
        f"the train files (fingerprint {old['train']} -> {moved['train']})")
    assert identity_difference(old, moved, ("val",)) == ""  # only the held-out split compared
    assert identity_difference(old, identity_of(["cat", "dog"], None, ["v1"])) == ""


def test_class_difference_names_each_side():
    assert class_difference(["a", "b"], ["a", "b"], "missing", "extra") == ""
    assert class_difference(["a", "b"], ["b", "c"], "only in train", "only in val") == (
        "only in train: a; only in val: c")
    assert class_difference(["a"], ["a", "b"], "missing", "extra") == "missing: none; extra: b"
    assert class_difference(["a", "b"], ["b", "a"], "m", "e", "reordered") == "reordered"


def test_a_dataset_counts_its_classes_and_a_split_its_images():
    import torch

    split = Split(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 1]))
    data = Dataset(split, ["a", "b"], (0.0,) * 3, (1.0,) * 3, {})
    assert len(split) == 3 and data.num_classes == 2 and data.train is None
    assert data.placement == "device" and data.notes == []
    with pytest.raises(TypeError):
        DatasetKind()  # abstract: a kind says how it loads
