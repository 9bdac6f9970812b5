"""Specifications of the COCO panoptic dataset and the panoptic augmentation pipelines."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from agvm_ds.data import CocoPanoptic, build_panoptic_transforms

STUFF, THING, CROWD = 5, 300, 70000  # ids that use the R, G and B channels
CATEGORIES = [
    {"id": 10, "name": "grass", "isthing": 0},
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 3, "name": "square", "isthing": True},
    {"id": 20, "name": "sky", "isthing": False},
]


def _segment_map() -> np.ndarray:
    """6 x 8: stuff on the left half, a thing at rows 1-3 / cols 5-6, a crowd thing at row 5, VOID elsewhere."""
    ids = np.zeros((6, 8), np.int64)
    ids[:, :4] = STUFF
    ids[1:4, 5:7] = THING
    ids[5, 4:] = CROWD
    return ids


def _write_png(path: Path, ids: np.ndarray) -> None:
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _build(root: Path, change=None, ids: np.ndarray | None = None) -> Path:
    """images/a.jpg, annotations/panoptic_val.json, annotations/panoptic_val/a.png; returns the json path."""
    (root / "images").mkdir(exist_ok=True)
    (root / "annotations" / "panoptic_val").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), 100, np.uint8)).save(root / "images" / "a.jpg")
    _write_png(root / "annotations" / "panoptic_val" / "a.png", _segment_map() if ids is None else ids)
    data = {
        "images": [{"id": 42, "file_name": "a.jpg", "width": 8, "height": 6}],
        "annotations": [{"image_id": 42, "file_name": "a.png", "segments_info": [
            {"id": STUFF, "category_id": 10, "iscrowd": 0, "area": 24},
            {"id": THING, "category_id": 3, "iscrowd": 0, "area": 6},
            {"id": CROWD, "category_id": 1, "iscrowd": 1, "area": 4},
        ]}],
        "categories": [dict(c) for c in CATEGORIES],
    }
    if change is not None:
        change(data)
    ann = root / "annotations" / "panoptic_val.json"
    ann.write_text(json.dumps(data))
    return ann


def test_category_maps_split_things_and_stuff_into_contiguous_labels(tmp_path):
    ds = CocoPanoptic(tmp_path / "images", _build(tmp_path))
    assert [c["id"] for c in ds.categories] == [1, 3, 10, 20] and ds.categories[1]["isthing"] == 1
    assert ds.thing_ids == [1, 3] and ds.stuff_ids == [10, 20]
    assert ds.thing_to_contiguous == {1: 1, 3: 2} and ds.contiguous_to_thing == {1: 1, 2: 3}
    assert ds.stuff_to_contiguous == {10: 1, 20: 2} and ds.contiguous_to_stuff == {1: 10, 2: 20}
    assert (ds.num_things, ds.num_stuff, ds.ids, ds.aspect_ratios) == (2, 2, [42], [8 / 6])
    assert ds.mask_dir == tmp_path / "annotations" / "panoptic_val"


def test_target_holds_the_thing_instance_and_a_semantic_map_of_stuff_things_and_void(tmp_path):
    image, target = CocoPanoptic(tmp_path / "images", _build(tmp_path))[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 8) and target["image_id"] == 42
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (6, 8)
    assert target["boxes"].tolist() == [[5.0, 1.0, 7.0, 4.0]]
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [0] and target["area"].tolist() == [6.0]
    assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
    assert torch.equal(target["masks"][0], torch.from_numpy(_segment_map() == THING).to(torch.uint8))
    sem = target["sem_seg"]
    assert isinstance(sem, tv_tensors.Mask) and sem.dtype == torch.int64 and sem.shape == (6, 8)
    assert sem[0].tolist() == [1, 1, 1, 1, 255, 255, 255, 255]  # stuff 10 -> 1, VOID -> 255
    assert sem[2].tolist() == [1, 1, 1, 1, 255, 0, 0, 255]  # the thing -> 0
    assert sem[5].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # the crowd thing: no instance, but 0


def test_gt_segments_gives_the_id_map_and_the_json_segments(tmp_path):
    ids, segments = CocoPanoptic(tmp_path / "images", _build(tmp_path)).gt_segments(42)
    assert ids.dtype == np.int64 and np.array_equal(ids, _segment_map())
    assert [(s["id"], s["category_id"], s["iscrowd"]) for s in segments] == [(5, 10, 0), (300, 3, 0), (70000, 1, 1)]


def _drop(key):
    return lambda d: d.pop(key)


@pytest.mark.parametrize("change, pattern", [
    (_drop("annotations"), r"panoptic_val\.json: not a COCO panoptic file \(no 'annotations' list\)"),
    (lambda d: d["images"][0].pop("height"), r"panoptic_val\.json: image id 42 has no 'height'"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"panoptic_val\.json: duplicate image id 42"),
    (lambda d: d["categories"][0].pop("isthing"), r"panoptic_val\.json: category id 10 has no 'isthing'"),
    (lambda d: d["categories"][0].update(isthing="yes"), r"category id 10 has an invalid 'isthing': 'yes'"),
    (lambda d: d["annotations"][0].update(image_id=7),
     r"panoptic_val\.json: annotations\[0\] \(image id 7\) refers to an image id that is not in 'images'"),
    (lambda d: d["annotations"][0]["segments_info"][1].update(category_id=99),
     r"annotations\[0\] \(image id 42\): segment id 300 has unknown category id 99"),
    (lambda d: d["annotations"][0]["segments_info"][1].update(id=STUFF),
     r"annotations\[0\] \(image id 42\): duplicate segment id 5"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])),
     r"annotations\[1\] \(image id 42\) is the second annotation of that image"),
])
def test_bad_json_entry_is_one_error_naming_file_and_entry(tmp_path, change, pattern):
    ann = _build(tmp_path, change)
    with pytest.raises(ValueError, match=pattern):
        CocoPanoptic(tmp_path / "images", ann)


def test_invalid_json_names_the_file(tmp_path):
    ann = _build(tmp_path)
    ann.write_text("{not json")
    with pytest.raises(ValueError, match=r"panoptic_val\.json: not a valid JSON file"):
        CocoPanoptic(tmp_path / "images", ann)


def test_missing_png_names_file_and_image(tmp_path):
    ann = _build(tmp_path)
    (tmp_path / "annotations" / "panoptic_val" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"panoptic_val\.json: annotation of image id 42: .*a\.png not found"):
        CocoPanoptic(tmp_path / "images", ann)


def test_segment_id_in_the_png_but_not_in_the_json_is_named_on_read(tmp_path):
    ids = _segment_map()
    ids[0, 7] = 1234
    ds = CocoPanoptic(tmp_path / "images", _build(tmp_path, ids=ids))
    with pytest.raises(ValueError, match=r"a\.png: segment id 1234 is in the PNG but not in the segments_info"):
        ds[0]


def test_png_of_another_size_is_named_on_read(tmp_path):
    ds = CocoPanoptic(tmp_path / "images", _build(tmp_path, ids=np.zeros((6, 9), np.int64)))
    with pytest.raises(ValueError, match=r"a\.png: panoptic PNG is 9x6 but image a\.jpg \(id 42\) is 8x6"):
        ds[0]


# ------------------------------------------------------------------------------------------------
# Transforms


def _panoptic_sample(size: int = 96) -> tuple[tv_tensors.Image, dict]:
    """Horizontal sem_seg bands (0..3, 24 px) with red = 60 * label + 10, and two square things."""
    sem = (torch.arange(size) // 24).unsqueeze(1).expand(size, size).clone()
    red = (sem * 60 + 10).to(torch.uint8)
    image = tv_tensors.Image(torch.stack([red, torch.full_like(red, 200), torch.full_like(red, 200)]))
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 4:20, 4:20] = 1
    masks[1, 60:90, 50:80] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[4, 4, 20, 20], [50, 60, 80, 90.0]]), format="XYXY",
                                          canvas_size=(size, size)),
        "labels": torch.tensor([1, 2]), "masks": tv_tensors.Mask(masks), "area": torch.tensor([256.0, 900.0]),
        "iscrowd": torch.zeros(2, dtype=torch.int64), "sem_seg": tv_tensors.Mask(sem), "image_id": 1,
    }
    return image, target


@pytest.mark.parametrize("recipe, kwargs", [
    ("multiscale", dict(min_size=[48, 64, 128], max_size=200)),
    ("lsj", dict(lsj_size=64, lsj_scale_range=(0.5, 2.0))),
])
def test_sem_seg_follows_the_image_through_resize_crop_and_flip(recipe, kwargs):
    t = build_panoptic_transforms(True, recipe, **kwargs)
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = t(*_panoptic_sample())
        sem = target["sem_seg"]
        assert sem.shape == image.shape[-2:] and sem.dtype == torch.int64
        n = len(target["labels"])
        assert target["boxes"].shape == (n, 4) and target["masks"].shape[0] == n == len(target["area"])
        red = image[0] * 255
        for value in sem.unique().tolist():
            if value == 255:  # padding: the image is padded with 0 there
                assert (red[sem == 255] == 0).all()
                continue
            share = ((red[sem == value] - (60 * value + 10)).abs() < 3).float().mean()
            assert share > 0.6


def test_lsj_pads_sem_seg_with_255_and_instance_masks_with_0():
    t = build_panoptic_transforms(True, "lsj", lsj_size=192, lsj_scale_range=(0.5, 0.5), hflip_prob=0.0)
    torch.manual_seed(0)
    image, target = t(*_panoptic_sample())
    padded = image[0] == 0
    assert padded.sum() == 192 * 192 - 96 * 96
    assert torch.equal(target["sem_seg"] == 255, padded)
    assert not target["masks"][:, padded].any()


def test_sanitize_drops_instances_but_leaves_sem_seg_alone_even_when_counts_match_its_height():
    size = 4  # as many instances as sem_seg rows: torchvision would index its rows
    image = tv_tensors.Image(torch.full((3, size, size), 50, dtype=torch.uint8))
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 1, 3], [0, 0, 4, 4], [2, 2, 4, 4.0]])  # the second is empty
    sem = torch.arange(size * size).reshape(size, size) % 3
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size)),
        "labels": torch.tensor([1, 2, 1, 2]), "masks": tv_tensors.Mask(torch.ones(size, size, size, dtype=torch.uint8)),
        "area": torch.ones(size), "iscrowd": torch.zeros(size, dtype=torch.int64),
        "sem_seg": tv_tensors.Mask(sem.clone()), "image_id": 0,
    }
    _, out = build_panoptic_transforms(True, "none")(image, target)
    assert out["labels"].tolist() == [1, 1, 2] and out["masks"].shape == (3, size, size)
    assert torch.equal(out["sem_seg"], sem)


def test_dataset_and_pipeline_together_give_aligned_float_samples(tmp_path):
    ds = CocoPanoptic(tmp_path / "images", _build(tmp_path),
                      transforms=build_panoptic_transforms(True, "multiscale", min_size=[12], max_size=100))
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 12, 16) and target["sem_seg"].shape == (12, 16)
    assert target["masks"].shape == (1, 12, 16) and set(target["sem_seg"].unique().tolist()) <= {0, 1, 255}
