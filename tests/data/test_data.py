"""Specifications of agvm_ds.data: synthetic COCO, the COCO dataset, transforms, samplers, loaders."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from agvm_ds.data import (
    CocoDetection,
    DistributedGroupedBatchSampler,
    ImageReadError,
    RECIPES,
    ShardedEvalSampler,
    aspect_ratio_group_ids,
    build_detection_loader,
    build_transforms,
    decode_segmentation,
    make_synthetic_coco,
)
from agvm_ds.data import synthetic

SMALL = dict(num_train=20, num_val=4, image_size=96)


# ------------------------------------------------------------------------------------------------
# Synthetic COCO


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "lock" not in p.name}


def test_synthetic_same_seed_gives_byte_identical_files(tmp_path):
    make_synthetic_coco(tmp_path / "a", seed=3, **SMALL)
    make_synthetic_coco(tmp_path / "b", seed=3, **SMALL)
    make_synthetic_coco(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_tree_bytes(tmp_path / d) for d in "abc")
    assert len([k for k in a if k.endswith(".jpg")]) == 24
    assert a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_synthetic_stamp_skips_same_params_and_regenerates_new_ones(tmp_path, monkeypatch):
    paths = make_synthetic_coco(tmp_path, **SMALL)
    before = _tree_bytes(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the stamp matched")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_write_split", fail)
        assert make_synthetic_coco(tmp_path, **SMALL) == paths
    assert _tree_bytes(tmp_path) == before

    make_synthetic_coco(tmp_path, **{**SMALL, "num_train": 5})
    assert sorted(p.name for p in paths.train_images.iterdir()) == [f"{i:012d}.jpg" for i in range(1, 6)]
    assert len(json.loads(paths.train_ann.read_text())["images"]) == 5

    (paths.train_images / f"{3:012d}.jpg").unlink()  # an incomplete set is regenerated too
    make_synthetic_coco(tmp_path, **{**SMALL, "num_train": 5})
    assert (paths.train_images / f"{3:012d}.jpg").is_file()


def test_synthetic_refuses_to_overwrite_data_it_did_not_generate(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "precious.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_synthetic_coco(tmp_path, **SMALL)
    assert (tmp_path / "images" / "precious.jpg").read_bytes() == b"not ours"


def test_synthetic_set_has_polygons_rles_crowds_empty_images_and_sparse_category_ids(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=40, num_val=2, image_size=128)
    data = json.loads(paths.train_ann.read_text())
    anns = data["annotations"]
    images = {img["id"]: img for img in data["images"]}
    assert sorted(c["id"] for c in data["categories"]) == [1, 3, 5, 7]
    assert {a["category_id"] for a in anns} == {1, 3, 5, 7}
    kinds = Counter(
        "polygon" if isinstance(a["segmentation"], list)
        else "uncompressed_rle" if isinstance(a["segmentation"]["counts"], list)
        else "rle"
        for a in anns
    )
    assert kinds["polygon"] > 10 and kinds["rle"] > 3 and kinds["uncompressed_rle"] >= 1
    crowd = [a for a in anns if a["iscrowd"]]
    assert len(crowd) >= 2 and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    annotated = {a["image_id"] for a in anns}
    assert len(set(images) - annotated) >= 2  # empty images
    assert max(Counter(a["image_id"] for a in anns if not a["iscrowd"]).values()) <= 6
    for a in anns:  # each annotation agrees with its own mask
        img = images[a["image_id"]]
        mask = decode_segmentation(a["segmentation"], img["height"], img["width"])
        assert mask.sum() == a["area"]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1] == [x, y, x + w, y + h]  # box = mask extent
    with Image.open(paths.train_images / images[1]["file_name"]) as im:
        assert im.size == (images[1]["width"], images[1]["height"]) and max(im.size) == 128


# ------------------------------------------------------------------------------------------------
# A hand-made COCO file: image 11 (40x30) holds a polygon (category 3), an RLE (category 7) and a
# crowd region; image 12 (20x20) has no annotation. Categories 3, 5, 7 map to labels 1, 2, 3.


def _uncompressed(mask: np.ndarray) -> dict:
    flat = mask.reshape(-1, order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _tiny_coco_dict() -> dict:
    rle_mask = np.zeros((30, 40), np.uint8)
    rle_mask[20:25, 25:35] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    crowd_mask = np.zeros((30, 40), np.uint8)
    crowd_mask[0:4, 30:40] = 1
    return {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 12, "file_name": "b.png", "width": 20, "height": 20},
        ],
        "annotations": [
            {"id": 101, "image_id": 11, "category_id": 3, "bbox": [5, 5, 10, 7], "area": 70.0, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 12, 5, 12]]},
            {"id": 102, "image_id": 11, "category_id": 7, "bbox": [25, 20, 10, 5], "area": 50.0, "iscrowd": 0,
             "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}},
            {"id": 103, "image_id": 11, "category_id": 3, "bbox": [30, 0, 10, 4], "area": 40.0, "iscrowd": 1,
             "segmentation": _uncompressed(crowd_mask)},
        ],
        "categories": [{"id": 3, "name": "square"}, {"id": 5, "name": "triangle"}, {"id": 7, "name": "star"}],
    }


def _write_tiny_coco(root: Path, data: dict | None = None) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(images / "a.png")
    Image.new("RGB", (20, 20), (200, 100, 0)).save(images / "b.png")
    ann = root / "instances.json"
    ann.write_text(json.dumps(data or _tiny_coco_dict()))
    return images, ann


def test_dataset_returns_boxes_labels_masks_of_known_annotations(tmp_path):
    ds = CocoDetection(*_write_tiny_coco(tmp_path), with_masks=True)
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert target["image_id"] == 11
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.value == "XYXY"
    assert target["boxes"].dtype == torch.float32 and tuple(target["boxes"].canvas_size) == (30, 40)
    assert target["boxes"].tolist() == [[5, 5, 15, 12], [25, 20, 35, 25]]  # crowd region 103 left out
    assert target["labels"].tolist() == [1, 3] and target["labels"].dtype == torch.int64
    assert target["area"].tolist() == [70.0, 50.0] and target["iscrowd"].tolist() == [0, 0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8 and masks.shape == (2, 30, 40)
    expected_polygon = torch.zeros(30, 40, dtype=torch.uint8)
    expected_polygon[5:12, 5:15] = 1
    expected_rle = torch.zeros(30, 40, dtype=torch.uint8)
    expected_rle[20:25, 25:35] = 1
    assert torch.equal(masks[0], expected_polygon) and torch.equal(masks[1], expected_rle)
    # the crowd region stays in the ground truth handed to the evaluator
    assert [a["id"] for a in ds.coco.imgToAnns[11]] == [101, 102, 103]


def test_image_without_annotations_gives_empty_targets_and_can_be_removed(tmp_path):
    images, ann = _write_tiny_coco(tmp_path)
    ds = CocoDetection(images, ann, with_masks=True)
    image, target = ds[1]
    assert image.shape == (3, 20, 20) and target["image_id"] == 12
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, 20, 20)
    assert CocoDetection(images, ann, remove_empty=True).ids == [11]


def test_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    ds = CocoDetection(*_write_tiny_coco(tmp_path))
    assert ds.contiguous_to_category_id == {1: 3, 2: 5, 3: 7} and ds.num_classes == 3
    assert all(ds.contiguous_to_category_id[ds.category_id_to_contiguous[c]] == c for c in (3, 5, 7))
    _, target = ds[0]
    assert [ds.contiguous_to_category_id[int(label)] for label in target["labels"]] == [3, 7]


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"bbox": [5, 5, 0, 7]}, "non-positive width"),
        ({"bbox": [5, 5, float("nan"), 7]}, "not finite"),
        ({"bbox": [35, 5, 10, 7]}, "outside"),
        ({"category_id": 4}, "unknown category id 4"),
    ],
)
def test_invalid_annotation_raises_naming_file_image_and_annotation_id(tmp_path, change, reason):
    data = _tiny_coco_dict()
    data["annotations"][0].update(change)
    images, ann = _write_tiny_coco(tmp_path, data)
    with pytest.raises(ValueError) as err:
        CocoDetection(images, ann)
    message = str(err.value)
    assert str(ann) in message and "a.png" in message and "annotation id 101" in message and reason in message


def test_annotation_of_missing_image_raises_with_its_ids(tmp_path):
    data = _tiny_coco_dict()
    data["annotations"][1]["image_id"] = 99
    images, ann = _write_tiny_coco(tmp_path, data)
    with pytest.raises(ValueError, match=r"annotation id 102, image id 99 \(not in the file\)"):
        CocoDetection(images, ann)


def test_skip_invalid_drops_them_with_one_warning_listing_ids(tmp_path):
    data = _tiny_coco_dict()
    data["annotations"][0]["bbox"] = [5, 5, -1, 7]
    data["annotations"][1]["bbox"] = [5, 5, 1, float("inf")]
    images, ann = _write_tiny_coco(tmp_path, data)
    with pytest.warns(UserWarning, match=r"dropped 2 invalid annotation\(s\), ids \[101, 102\]") as record:
        ds = CocoDetection(images, ann, skip_invalid=True)
    assert len(record) == 1
    assert ds[0][1]["boxes"].shape == (0, 4)
    assert sorted(ds.coco.anns) == [103]  # the evaluator's ground truth agrees with the targets


def test_duplicate_annotation_id_is_one_error_naming_it(tmp_path):
    data = _tiny_coco_dict()
    data["annotations"][1]["id"] = 101
    images, ann = _write_tiny_coco(tmp_path, data)
    with pytest.raises(ValueError, match=r"1 invalid annotation\(s\).*\n  annotation id 101, image a.png \(id 11\): "
                                         r"duplicate annotation id$") as err:
        CocoDetection(images, ann)
    assert str(ann) in str(err.value)


def _structure_error(tmp_path: Path, data_or_text) -> str:
    images, ann = _write_tiny_coco(tmp_path)
    ann.write_text(data_or_text if isinstance(data_or_text, str) else json.dumps(data_or_text))
    with pytest.raises(ValueError) as err:
        CocoDetection(images, ann)
    message = str(err.value)
    assert message.startswith(f"{ann}: ") and "\n" not in message
    return message[len(f"{ann}: "):]


def test_malformed_json_names_the_file(tmp_path):
    message = _structure_error(tmp_path, '{"images": [{"id": 1,}]}')
    assert message.startswith("not a valid JSON file (Expecting property name enclosed in double quotes: line 1")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["images"][1].update(id=11), "duplicate image id 11 (image entries 0 and 1)"),
    (lambda d: d["images"][1].pop("width"), "image id 12 has no 'width'"),
    (lambda d: d["images"][0].pop("height"), "image id 11 has no 'height'"),
    (lambda d: d["images"][0].update(width=0), "image id 11 has an invalid 'width': 0"),
    (lambda d: d["images"][1].pop("id"), "image entry 1 has no 'id'"),
    (lambda d: d["images"][1].update(file_name=None), "image id 12 has an invalid 'file_name': None"),
    (lambda d: d["categories"].append({"id": 3, "name": "again"}), "duplicate category id 3 (category entries 0 and 3)"),
    (lambda d: d["annotations"].append([1, 2]), "annotations[3] is not a JSON object"),
    (lambda d: d.pop("categories"), "not a COCO instances file (no 'categories' list)"),
])
def test_bad_image_or_category_entry_is_one_error_naming_file_and_entry(tmp_path, change, expected):
    data = _tiny_coco_dict()
    change(data)
    assert _structure_error(tmp_path, data) == expected


def _mode_dataset(tmp_path: Path, image: Image.Image, file_name: str) -> CocoDetection:
    """A one-image dataset whose image file PIL writes in ``image``'s mode."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    image.save(images / file_name)
    width, height = image.size
    data = {"images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
            "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return CocoDetection(images, tmp_path / "ann.json")


def _image(mode: str, values) -> Image.Image:
    image = Image.new(mode, (3, 2))
    image.putdata([values] * 6)
    return image


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (3, 2))
    image.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    image.putdata([1, 0, 1, 1, 1, 1])
    if transparent:
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("make, file_name, expected", [
    (lambda: Image.fromarray(np.full((2, 3), 135 * 257, np.uint16)), "grey16.png", (135, 135, 135)),  # I;16
    (lambda: _image("I;16B", 135 * 257), "grey16b.tif", (135, 135, 135)),
    (lambda: _image("I", 65535), "grey32.tif", (255, 255, 255)),
    (lambda: _image("I;16", 128), "dark16.png", (0, 0, 0)),  # 128/257 rounds to 0, not clipped to 128
    (lambda: _image("L", 77), "grey.png", (77, 77, 77)),
    (lambda: _image("1", 1), "bits.png", (255, 255, 255)),
    (lambda: _image("LA", (100, 50)), "grey_alpha.png", (100, 100, 100)),
    (lambda: _image("RGBA", (1, 2, 3, 0)), "rgba.png", (1, 2, 3)),
    (lambda: _image("CMYK", (0, 255, 0, 0)), "cmyk.tif", (255, 0, 255)),
    (lambda: _image("CMYK", (0, 0, 0, 255)), "cmyk_black.tif", (0, 0, 0)),
    (lambda: _palette_image(transparent=False), "palette.png", (10, 20, 30)),
    (lambda: _palette_image(transparent=True), "palette_alpha.png", (10, 20, 30)),  # the transparent index
])
def test_image_modes_decode_to_the_right_8bit_rgb(tmp_path, make, file_name, expected):
    image = make()
    ds = _mode_dataset(tmp_path, image, file_name)
    assert Image.open(tmp_path / "images" / file_name).mode == image.mode  # the file really is in that mode
    decoded, _ = ds[0]
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 2, 3)
    assert decoded[:, 0, 1].tolist() == list(expected)


def test_16bit_image_scales_the_full_range(tmp_path):
    ramp = np.array([[0, 257, 32896], [65535, 65534, 200]], np.uint16)
    decoded, _ = _mode_dataset(tmp_path, Image.fromarray(ramp), "ramp.png")[0]
    assert decoded[0].tolist() == [[0, 1, 128], [255, 255, 1]]


@pytest.mark.parametrize("make, file_name, mode", [
    (lambda: _image("F", 0.5), "float.tif", "F"),
    (lambda: _image("I", -5), "negative.tif", "I"),
])
def test_unsupported_image_mode_is_refused_by_name_and_path(tmp_path, make, file_name, mode):
    ds = _mode_dataset(tmp_path, make(), file_name)
    with pytest.raises(ImageReadError) as err:
        ds[0]
    assert str(tmp_path / "images" / file_name) in str(err.value) and repr(mode) in str(err.value)


def test_missing_annotation_file_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nope" / "instances.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        CocoDetection(tmp_path, missing)


def _corrupt_dataset(tmp_path: Path) -> tuple[CocoDetection, Path]:
    data = _tiny_coco_dict()
    data["images"][0]["file_name"] = "broken.jpg"
    images, ann = _write_tiny_coco(tmp_path, data)
    bad = images / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg " * 20)
    return CocoDetection(images, ann), bad


def test_corrupt_image_raises_naming_the_file(tmp_path):
    ds, bad = _corrupt_dataset(tmp_path)
    with pytest.raises(ImageReadError, match=str(bad)):
        ds[0]
    assert ds[1][1]["image_id"] == 12  # other images still load


def test_corrupt_image_error_names_the_file_through_a_worker_process(tmp_path):
    ds, bad = _corrupt_dataset(tmp_path)
    loader = build_detection_loader(ds, batch_size=1, train=False, num_workers=1)
    with pytest.raises(ImageReadError) as err:
        list(loader)
    assert "worker process" in str(err.value) and str(bad) in str(err.value)


# ------------------------------------------------------------------------------------------------
# Transforms


def _shapes_sample() -> tuple[tv_tensors.Image, dict]:
    """An 80x60 image with three instances whose boxes are exactly their masks' extents."""
    h, w = 60, 80
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 5:25, 4:30] = 1
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = ((xx - 55.5) ** 2 + (yy - 35.5) ** 2 <= 15**2).to(torch.uint8)
    masks[2, 40:58, 2:12] = 1
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    target = {
        "boxes": tv_tensors.BoundingBoxes(_extents(masks), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2, 3]),
        "area": masks.flatten(1).sum(1).float(),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "image_id": 5,
    }
    return image, target


def _extents(masks: torch.Tensor) -> torch.Tensor:
    boxes = []
    for m in masks:
        rows, cols = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def test_multiscale_resize_and_flip_keep_boxes_on_their_masks():
    image, target = _shapes_sample()
    transform = build_transforms(True, "multiscale", min_size=(90,), max_size=1000, hflip_prob=1.0)
    out_image, out = transform(image, target)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 90, 120) and out_image.max() <= 1.0
    assert out["boxes"].canvas_size == (90, 120) and out["masks"].shape == (3, 90, 120)
    assert torch.allclose(out["boxes"], _extents(out["masks"]), atol=1.5)
    # flipped: instance 0 was at the left, now at the right
    assert out["boxes"][0].tolist() == pytest.approx([120 - 30 * 1.5, 5 * 1.5, 120 - 4 * 1.5, 25 * 1.5])
    assert out["labels"].tolist() == [1, 2, 3] and out["image_id"] == 5


def test_lsj_crops_keep_boxes_masks_labels_and_areas_together():
    image, target = _shapes_sample()
    transform = build_transforms(True, "lsj", lsj_size=64, lsj_scale_range=(0.5, 2.0))
    dropped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out = transform(image, target)
        n = len(out["boxes"])
        dropped += 3 - n
        assert out_image.shape == (3, 64, 64) and out["masks"].shape == (n, 64, 64)
        assert len(out["labels"]) == len(out["area"]) == len(out["iscrowd"]) == n
        assert all(m.any() for m in out["masks"])
        assert torch.allclose(out["boxes"], _extents(out["masks"]), atol=2.0)
    assert dropped > 0  # some crops removed instances, and their fields went with them


def test_eval_transform_only_converts_to_float():
    image, target = _shapes_sample()
    out_image, out = build_transforms(False, "lsj")(image, target)
    assert torch.allclose(out_image, image.float() / 255)
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["masks"], target["masks"])


def test_unknown_recipe_error_lists_valid_recipes():
    with pytest.raises(ValueError) as err:
        build_transforms(True, "mosaic")
    assert "'mosaic'" in str(err.value) and all(r in str(err.value) for r in RECIPES)


# ------------------------------------------------------------------------------------------------
# Samplers and loaders


def test_aspect_ratio_groups_follow_torchvision_bins():
    # group_factor=3: bin edges 2**linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    assert aspect_ratio_group_ids([0.4, 0.75, 1.0, 1.33, 3.0], group_factor=3) == [0, 2, 4, 5, 7]
    assert aspect_ratio_group_ids([0.75, 1.0, 1.33], group_factor=0) == [0, 1, 1]


GROUPS = [i % 3 for i in range(103)]  # 3 aspect-ratio groups of 35, 34 and 34 images


def _rank_batches(world_size, epoch=0, seed=0, batch_size=4, start_batch=0):
    samplers = [
        DistributedGroupedBatchSampler(GROUPS, batch_size, r, world_size, seed=seed, epoch=epoch, start_batch=start_batch)
        for r in range(world_size)
    ]
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_grouped_sampler_ranks_get_equal_disjoint_group_pure_batches(world_size):
    per_rank = _rank_batches(world_size)
    full_batches = 35 // 4 + 34 // 4 + 34 // 4  # 24
    assert [len(b) for b in per_rank] == [full_batches // world_size] * world_size
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat))  # disjoint, no repeats
    assert all(len(batch) == 4 and len({GROUPS[i] for i in batch}) == 1 for b in per_rank for batch in b)


def test_grouped_sampler_order_is_a_function_of_seed_and_epoch():
    assert _rank_batches(2, epoch=1) == _rank_batches(2, epoch=1)
    assert _rank_batches(2, epoch=1) != _rank_batches(2, epoch=2)
    assert _rank_batches(2, epoch=1) != _rank_batches(2, epoch=1, seed=1)
    assert [len(b) for b in _rank_batches(2, epoch=5)] == [len(b) for b in _rank_batches(2, epoch=0)]


def test_grouped_sampler_start_batch_yields_the_tail_of_the_epoch():
    full = _rank_batches(2, epoch=3)
    resumed = _rank_batches(2, epoch=3, start_batch=7)
    assert resumed == [batches[7:] for batches in full]
    sampler = DistributedGroupedBatchSampler(GROUPS, 4, 0, 2, epoch=3, start_batch=7)
    assert len(sampler) == 12 - 7
    sampler.set_epoch(4)  # the next epoch starts from its beginning
    assert len(list(sampler)) == 12


class _FakeDetectionSet(torch.utils.data.Dataset):
    """Index -> a tiny image and target; aspect ratios without files (enough for loader tests)."""

    def __init__(self, n: int):
        self.aspect_ratios = [0.75 if i % 4 == 0 else 1.0 for i in range(n)]

    def __len__(self):
        return len(self.aspect_ratios)

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4), {"image_id": i + 100}


def _ids(loader):
    return [[t["image_id"] for t in targets] for _, targets in loader]


def test_loader_resumes_at_start_batch_with_worker_processes():
    ds = _FakeDetectionSet(50)
    fresh = build_detection_loader(ds, 3, rank=1, world_size=2, train=True, num_workers=2, seed=7, epoch=2)
    resumed = build_detection_loader(ds, 3, rank=1, world_size=2, train=True, num_workers=2, seed=7, epoch=2, start_batch=4)
    full = _ids(fresh)
    assert len(resumed) == len(full) - 4
    assert _ids(resumed) == full[4:]
    images, targets = next(iter(fresh))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3


@pytest.mark.parametrize("num_samples", [0, 1, 5, 10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_image_exactly_once(num_samples, world_size):
    shards = [list(ShardedEvalSampler(num_samples, r, world_size)) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    even = [list(ShardedEvalSampler(num_samples, r, world_size, even=True)) for r in range(world_size)]
    assert len({len(s) for s in even}) == 1  # equal batch counts, for ZeRO-3 inference
    assert {i for s in even for i in s} == set(range(num_samples))
    # the owned heads of the padded shards are the unpadded shards: dropping the rest counts each image once,
    # also when a rank owns none and pads with an image of rank 0
    owned = [ShardedEvalSampler(num_samples, r, world_size, even=True) for r in range(world_size)]
    assert [s.indices[:s.owned] for s in owned] == shards


def test_eval_loader_is_ordered_sharded_and_unpadded():
    ds = _FakeDetectionSet(11)
    ids = [_ids(build_detection_loader(ds, 2, rank=r, world_size=3, train=False, num_workers=0)) for r in range(3)]
    assert ids[0] == [[100, 103], [106, 109]] and ids[2] == [[102, 105], [108]]
    assert sorted(i for rank in ids for batch in rank for i in batch) == list(range(100, 111))


def test_loader_on_synthetic_coco_yields_float_images_and_targets(tmp_path):
    paths = make_synthetic_coco(tmp_path, num_train=12, num_val=0, image_size=64)
    ds = CocoDetection(paths.train_images, paths.train_ann, build_transforms(True, "hflip"), with_masks=True)
    loader = build_detection_loader(ds, 2, rank=0, world_size=2, train=True, num_workers=1, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) >= 2
    for images, targets in batches:
        shapes = {tuple(im.shape) for im in images}
        assert len(shapes) == 1  # aspect-ratio grouping: one shape per batch for this set
        assert all(im.dtype == torch.float32 for im in images)
        assert all(t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0] for t in targets)
        assert all(1 <= int(label) <= 4 for t in targets for label in t["labels"])
