"""Specifications of the synthetic semantic and panoptic sets: deterministic, reused, readable, complete."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agvm_ds.data import (
    CocoPanoptic,
    SemanticSegmentation,
    make_synthetic_panoptic,
    make_synthetic_semantic,
    read_class_names,
)
from agvm_ds.data import synthetic_segmentation as synth

SMALL = dict(num_train=24, num_val=4, image_size=96)
MAKERS = {"semantic": make_synthetic_semantic, "panoptic": make_synthetic_panoptic}
WRITERS = {"semantic": "_write_semantic_split", "panoptic": "_write_panoptic_split"}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and "lock" not in p.name)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.mark.parametrize("task", sorted(MAKERS))
def test_same_seed_gives_byte_identical_files_and_another_seed_other_files(tmp_path, task):
    make = MAKERS[task]
    make(tmp_path / "a", seed=3, **SMALL)
    make(tmp_path / "b", seed=3, **SMALL)
    make(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_tree_bytes(tmp_path / d) for d in "abc")
    assert len([k for k in a if k.endswith(".jpg")]) == 28 and len([k for k in a if k.endswith(".png")]) == 28
    assert a == b
    first_jpg = f"images/train/{1:012d}.jpg"
    assert a[first_jpg] != c[first_jpg]


@pytest.mark.parametrize("task", sorted(MAKERS))
def test_second_call_reuses_the_set_and_new_parameters_regenerate(tmp_path, monkeypatch, task):
    make = MAKERS[task]
    paths = make(tmp_path, **SMALL)
    before = _tree_bytes(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the stamp matched")

    with monkeypatch.context() as m:
        m.setattr(synth, WRITERS[task], fail)
        assert make(tmp_path, **SMALL) == paths
    assert _tree_bytes(tmp_path) == before
    make(tmp_path, **{**SMALL, "num_train": 5})
    assert sorted(p.name for p in paths.train_images.iterdir()) == [f"{i:012d}.jpg" for i in range(1, 6)]


def test_generators_refuse_to_overwrite_data_they_did_not_generate(tmp_path):
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "precious.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="make_synthetic_semantic .*refusing to overwrite"):
        make_synthetic_semantic(tmp_path, **SMALL)
    assert (tmp_path / "labels" / "precious.png").read_bytes() == b"not ours"


def test_semantic_set_is_readable_and_its_train_split_shows_every_class_and_some_ignore(tmp_path):
    paths = make_synthetic_semantic(tmp_path, **SMALL)
    classes = read_class_names(paths.classes_file)
    assert classes == ["sky", "grass", "water", "wall", "circle", "square", "triangle", "star"]
    train = SemanticSegmentation(paths.train_images, paths.train_labels, classes)
    val = SemanticSegmentation(paths.val_images, paths.val_labels, classes)
    assert len(train) == 24 and len(val) == 4 and len(set(train.aspect_ratios)) > 1
    counts = np.zeros(256, np.int64)
    for i in range(len(train)):
        counts += np.bincount(train[i][1]["sem_seg"].reshape(-1).numpy(), minlength=256)
    assert (counts[: len(classes)] > 0).all()
    assert counts[255] > 0 and counts[len(classes):255].sum() == 0


def test_panoptic_set_is_readable_with_every_category_crowds_void_and_empty_images(tmp_path):
    paths = make_synthetic_panoptic(tmp_path, **SMALL)
    train = CocoPanoptic(paths.train_images, paths.train_ann)  # default mask_dir = the json's stem
    assert train.mask_dir == paths.train_masks and len(train) == 24
    assert (train.num_things, train.num_stuff) == (4, 4)
    data = json.loads(paths.train_ann.read_text())
    segments = [s for a in data["annotations"] for s in a["segments_info"]]
    assert {s["category_id"] for s in segments} == {c["id"] for c in data["categories"]}
    assert any(s["iscrowd"] for s in segments)
    void = 0
    for i in range(len(train)):
        image, target = train[i]  # checks every PNG id against its segments_info
        ids, _ = train.gt_segments(train.ids[i])
        void += int((ids == 0).sum())
        assert target["sem_seg"].shape == image.shape[-2:]
        assert set(target["sem_seg"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert void > 0
    assert len(train[5][1]["labels"]) == 0  # every 16th image has no things
    CocoPanoptic(paths.val_images, paths.val_ann)


def test_semantic_and_panoptic_sets_draw_the_same_scenes(tmp_path):
    semantic = make_synthetic_semantic(tmp_path / "s", **SMALL)
    panoptic = make_synthetic_panoptic(tmp_path / "p", **SMALL)
    name = f"{7:012d}.jpg"
    assert (semantic.train_images / name).read_bytes() == (panoptic.train_images / name).read_bytes()
    label = np.asarray(Image.open(semantic.train_labels / name.replace(".jpg", ".png")))
    sem = CocoPanoptic(panoptic.train_images, panoptic.train_ann)[6][1]["sem_seg"].numpy()
    stuff = label < 4
    assert np.array_equal(sem[stuff], label[stuff] + 1)  # stuff index k -> contiguous stuff label k + 1
    assert (sem[(label >= 4) & (label < 255)] == 0).all()
