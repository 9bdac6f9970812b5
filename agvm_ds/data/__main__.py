"""``python -m agvm_ds.data ROOT [--task coco|semantic|panoptic] ...``: make (or reuse) a synthetic set."""
from __future__ import annotations

import argparse
from dataclasses import asdict

from .synthetic import main as coco_main
from .synthetic_segmentation import make_synthetic_panoptic, make_synthetic_semantic

_MAKERS = {"semantic": make_synthetic_semantic, "panoptic": make_synthetic_panoptic}


def main(argv: list[str] | None = None) -> None:
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--task", choices=("coco", *_MAKERS), default="coco")
    known, rest = chooser.parse_known_args(argv)
    if known.task == "coco":
        coco_main(rest)
        return
    parser = argparse.ArgumentParser(prog="python -m agvm_ds.data --task " + known.task,
                                     description=f"Generate (or reuse) the synthetic {known.task} segmentation set.")
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(rest)
    paths = _MAKERS[known.task](args.root, args.num_train, args.num_val, args.image_size, args.seed)
    for name, path in asdict(paths).items():
        if name != "root":
            print(f"{name}: {path}")


main()
