"""Specifications of the semantic segmentation dataset (ADE20K layout) and its augmentation recipe."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from agvm_ds.data import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    ImageReadError,
    SemanticSegmentation,
    ade20k,
    build_semantic_transforms,
    read_class_names,
)
from agvm_ds.data.segmentation_transforms import RandomCropCatMax

CLASSES = ["sky", "grass", "road"]


def _write(folder: Path, stem: str, label: np.ndarray, *, image_size: tuple[int, int] | None = None,
           mode: str = "L", suffix: str = ".jpg") -> None:
    """An image (image_size = (w, h), default the label's) and its label PNG, under folder/images and folder/labels."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    w, h = image_size or (label.shape[1], label.shape[0])
    Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(folder / "images" / f"{stem}{suffix}")
    Image.fromarray(label.astype(np.uint8)).convert(mode).save(folder / "labels" / f"{stem}.png")


def _dataset(root: Path, **kwargs) -> SemanticSegmentation:
    return SemanticSegmentation(root / "images", root / "labels", CLASSES, **kwargs)


def _stripes(h: int = 6, w: int = 8) -> np.ndarray:
    return np.tile(np.array([0, 1, 2, 255], np.uint8).repeat(w // 4), (h, 1))


def test_sample_is_uint8_image_and_int64_label_with_headers_giving_aspect_ratios(tmp_path):
    _write(tmp_path, "b", _stripes(6, 8))
    _write(tmp_path, "a", _stripes(8, 4), suffix=".png")
    ds = _dataset(tmp_path)
    assert [p.name for p, _ in ds.files] == ["a.png", "b.jpg"]
    assert ds.aspect_ratios == [0.5, 8 / 6] and ds.ids == [0, 1] and ds.num_classes == 3
    image, target = ds[1]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 6, 8)
    assert isinstance(target["sem_seg"], tv_tensors.Mask) and target["sem_seg"].dtype == torch.int64
    assert target["sem_seg"][0].tolist() == [0, 0, 1, 1, 2, 2, 255, 255] and target["image_id"] == 1


def test_palette_label_reads_its_indices(tmp_path):
    _write(tmp_path, "a", _stripes(), mode="P")
    assert _dataset(tmp_path)[0][1]["sem_seg"][0].tolist() == [0, 0, 1, 1, 2, 2, 255, 255]


def test_reduce_zero_label_makes_0_ignored_and_shifts_the_rest_down(tmp_path):
    _write(tmp_path, "a", np.array([[0, 1, 2, 3, 255]], np.uint8))
    assert _dataset(tmp_path, reduce_zero_label=True)[0][1]["sem_seg"].tolist() == [[255, 0, 1, 2, 255]]


def test_label_value_beyond_the_classes_is_an_error_on_read_naming_file_value_and_count(tmp_path):
    _write(tmp_path, "a", np.array([[0, 1, 7, 255]], np.uint8))
    ds = _dataset(tmp_path)  # construction reads headers only
    with pytest.raises(ValueError, match=r"a\.png: label value 7 .*3 classes"):
        ds[0]


def test_image_without_label_is_named(tmp_path):
    _write(tmp_path, "a", _stripes())
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(ValueError, match=r"no label PNG for image\(s\) lonely\.jpg"):
        _dataset(tmp_path)


def test_label_without_image_is_named(tmp_path):
    _write(tmp_path, "a", _stripes())
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "labels" / "orphan.png")
    with pytest.raises(ValueError, match=r"no image for label\(s\) orphan\.png"):
        _dataset(tmp_path)


def test_label_of_another_size_names_both_files_and_sizes(tmp_path):
    _write(tmp_path, "a", _stripes(6, 8), image_size=(9, 6))
    with pytest.raises(ValueError, match=r"a\.png: label is 8x6 but image .*a\.jpg is 9x6"):
        _dataset(tmp_path)


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_label_that_is_not_8bit_single_channel_is_named(tmp_path, mode):
    _write(tmp_path, "a", _stripes(), mode=mode)
    with pytest.raises(ValueError, match=rf"a\.png: label PNG has PIL mode '{mode}'"):
        _dataset(tmp_path)


def test_missing_folder_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="label folder not found: .*labels"):
        _dataset(tmp_path)


def test_corrupt_image_raises_naming_it(tmp_path):
    _write(tmp_path, "a", _stripes(), suffix=".png")
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageReadError, match=r"a\.png"):
        _dataset(tmp_path)


def test_class_names_file_skips_blank_lines_and_refuses_duplicates_and_empty_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("sky\n\n  grass \nroad\n")
    assert read_class_names(path) == ["sky", "grass", "road"]
    path.write_text("sky\ngrass\n\nsky\n")
    with pytest.raises(ValueError, match=r"classes\.txt: line 4: duplicate class name 'sky' \(first on line 1\)"):
        read_class_names(path)
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=r"classes\.txt: no class names"):
        read_class_names(path)


def test_ade20k_reads_its_layout_with_150_classes_and_zero_ignored(tmp_path):
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"
    for sub in ("images/validation", "annotations/validation"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "images/validation/x.jpg")
    Image.fromarray(np.array([[0, 1], [150, 3]], np.uint8)).save(tmp_path / "annotations/validation/x.png")
    assert ade20k(tmp_path, "validation")[0][1]["sem_seg"].tolist() == [[255, 0], [149, 2]]
    with pytest.raises(ValueError, match="unknown ADE20K split 'val'"):
        ade20k(tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# Recipe


def _sample(h: int = 120, w: int = 160) -> tuple[tv_tensors.Image, dict]:
    """Vertical label stripes (0, 1, 2, 255, ...) 20 px wide; the image's red channel is 60 * label + 10."""
    label = torch.tensor([0, 1, 2, 255] * (w // 80))[torch.arange(w) // 20].expand(h, w).clone()
    red = torch.where(label == 255, 250, label * 60 + 10).to(torch.uint8)
    image = torch.stack([red, torch.full_like(red, 50), torch.full_like(red, 90)])
    return tv_tensors.Image(image), {"sem_seg": tv_tensors.Mask(label), "image_id": 0}


def test_train_recipe_crops_at_most_crop_size_keeping_labels_in_the_label_set():
    t = build_semantic_transforms(True, scale=(320, 96), crop_size=64)
    for seed in range(8):
        torch.manual_seed(seed)
        image, target = t(*_sample())
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert image.shape[-2:] == target["sem_seg"].shape and max(image.shape[-2:]) <= 64
        assert target["sem_seg"].dtype == torch.int64
        assert set(target["sem_seg"].unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}


def test_train_recipe_is_a_function_of_torch_seed():
    t = build_semantic_transforms(True, scale=(320, 96), crop_size=64)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(t(*_sample()))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1]["sem_seg"], outputs[1][1]["sem_seg"])
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_flip_moves_image_and_label_together():
    t = build_semantic_transforms(True, scale=(160, 120), ratio_range=(1.0, 1.0), crop_size=512, hflip_prob=1.0,
                                  photometric=False)
    image, target = _sample()
    out_image, out_target = t(image, target)
    assert torch.equal(out_target["sem_seg"], target["sem_seg"].flip(-1))
    assert torch.allclose(out_image, image.flip(-1).float() / 255)


def test_resize_crop_and_flip_keep_each_label_on_its_own_colour():
    t = build_semantic_transforms(True, scale=(320, 96), crop_size=64, photometric=False)
    for seed in range(6):
        torch.manual_seed(seed)
        image, target = t(*_sample())
        red = image[0] * 255
        for value in target["sem_seg"].unique().tolist():
            expected = 250 if value == 255 else value * 60 + 10
            reds = red[target["sem_seg"] == value]
            if reds.numel() >= 4 * red.shape[0]:  # a stripe at least 4 px wide: only its edges are blended
                assert ((reds - expected).abs() < 2).float().mean() > 0.6


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = torch.zeros(100, 100, dtype=torch.int64)
    label[:50, :50] = 1
    sample = (tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8)), {"sem_seg": tv_tensors.Mask(label)})

    def balanced_share(ratio: float) -> float:
        crop, hits = RandomCropCatMax(50, ratio), 0
        for seed in range(40):
            torch.manual_seed(seed)
            counts = torch.bincount(crop(*sample)[1]["sem_seg"].reshape(-1), minlength=2)
            hits += bool(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
        return hits / 40

    assert balanced_share(0.75) >= 0.95 and balanced_share(1.0) <= 0.6


def test_eval_recipe_only_converts_and_pipelines_pickle():
    image, target = _sample()
    out_image, out_target = build_semantic_transforms(False)(image, target)
    assert torch.allclose(out_image, image.float() / 255) and torch.equal(out_target["sem_seg"], target["sem_seg"])
    restored = pickle.loads(pickle.dumps(build_semantic_transforms(True, crop_size=64)))
    torch.manual_seed(0)
    assert restored(*_sample())[0].shape[-1] <= 64
