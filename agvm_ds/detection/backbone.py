"""timm bodies as torchvision detection backbones (the role of torchvision's ``backbone_utils.py``).

torchvision's ``BackboneWithFPN`` takes stage outputs through ``IntermediateLayerGetter``, which cannot
reach into a timm Swin (its stages return NHWC). timm's ``forward_intermediates`` returns NCHW stage
outputs for ResNet and Swin alike, so one small adapter serves both families.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import timm
import torch
from timm.layers import LayerNorm2d, use_reentrant_ckpt
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork

from .spec import backbone_family

__all__ = ["TimmFPNBackbone", "create_body", "freeze_stages"]


class TimmFPNBackbone(nn.Module):
    """A timm body, one optional norm per stage output, and a torchvision FPN on top.

    The interface torchvision's detectors expect of a backbone: ``out_channels`` and a forward
    returning an ``OrderedDict`` of NCHW maps, keys ``"0"``, ``"1"``, ... (the finest first), then the
    extra levels (``"pool"``, or ``"p6"``/``"p7"``).

    Args:
        body: a timm model with ``forward_intermediates`` and ``prune_intermediate_layers``; it is
            pruned here to the stages ``indices`` needs, its classifier head and its final norm
            removed (they would get no gradient, which DeepSpeed and DDP reject).
        indices: the stage outputs fed to the FPN (timm's convention: an int takes the last n).
        out_channels: FPN width.
        stage_norms: a LayerNorm per stage output, as the Swin detection recipe adds (Swin stages
            end in a residual sum with no norm).
    """

    def __init__(
        self,
        body: nn.Module,
        indices: int,
        out_channels: int,
        extra_blocks: ExtraFPNBlock,
        stage_norms: bool,
    ) -> None:
        super().__init__()
        self.indices = body.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        in_channels = [body.feature_info[i]["num_chs"] for i in self.indices]
        self.body = body
        self.norms: Optional[nn.ModuleList] = (
            nn.ModuleList(LayerNorm2d(c) for c in in_channels) if stage_norms else None
        )
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward_body(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The (normalised) stage outputs, finest first."""
        features = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        if self.norms is not None:
            features = [norm(f) for norm, f in zip(self.norms, features)]
        return features

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.forward_body(x))))


def create_body(
    name: str,
    norm: str = "frozen_bn",
    pretrained: Union[bool, str] = False,
    pretrained_file: Optional[str] = None,
    checkpointing: bool = False,
    **kwargs,
) -> nn.Module:
    """A timm classification model to be used as a detection body.

    Swin bodies accept any input size (``strict_img_size=False``; torchvision pads to multiples of
    32) and partition every stage into full, shifted windows (``always_partition=True``) as the Swin
    detection recipe does; otherwise timm shrinks the window of a stage whose 224-pixel reference map
    is no larger than it, and drops the shift there.

    Args:
        norm: ResNet only: ``frozen_bn``, ``bn`` or ``sync_bn``.
        pretrained: True (timm's default weights of ``name``) or a tagged timm name of them, through
            timm's hub cache; offline and not cached, a RuntimeError names them and ``pretrained_file``.
        pretrained_file: a local checkpoint loaded through timm (never a download).
        checkpointing: checkpoint each block (timm ``set_grad_checkpointing``).
        kwargs: more ``timm.create_model`` arguments.
    """
    if backbone_family(name) == "resnet":
        kwargs["norm_layer"] = _frozen_bn if norm == "frozen_bn" else nn.BatchNorm2d
        if norm == "frozen_bn":
            # timm zero-initialises each block's last BN weight; frozen at zero (no weights loaded),
            # it would switch every residual branch off for good.
            kwargs.setdefault("zero_init_last", False)
    elif norm != "frozen_bn":
        raise ValueError(f"norm={norm!r} applies to ResNet bodies only; {name} uses LayerNorm")
    else:
        kwargs.update(strict_img_size=False, always_partition=True)
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file={pretrained_file!r}: no such file")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    if pretrained and pretrained_file is None:
        body = _from_timm_hub(pretrained if isinstance(pretrained, str) else name, **kwargs)
    else:
        body = timm.create_model(name, pretrained=pretrained_file is not None, **kwargs)
    if norm == "sync_bn":
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    if checkpointing:
        if use_reentrant_ckpt():
            # Reentrant checkpointing drops the gradients of a block whose input needs none (the
            # first trained stage after frozen ones); timm's default is non-reentrant.
            raise ValueError("checkpointing needs timm's non-reentrant checkpointing; unset TIMM_REENTRANT_CKPT")
        body.set_grad_checkpointing(True)
    return body


def _from_timm_hub(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, with one clear error when the weights cannot be had."""
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as error:  # huggingface_hub's offline / not-found / connection errors are OSErrors
        weights = get_pretrained_cfg(name).hf_hub_id or get_pretrained_cfg(name).url
        raise RuntimeError(
            f"pretrained weights {weights!r} of backbone {name!r} are not in timm's cache and could not be "
            f"downloaded ({type(error).__name__}); fetch them where the network is reachable (timm.create_model("
            f"{name!r}, pretrained=True) fills the cache), or set model_overrides.pretrained_file to a local "
            "checkpoint of them"
        ) from error


def _frozen_bn(num_features: int, device=None, dtype=None, **kwargs) -> FrozenBatchNorm2d:
    """torchvision's FrozenBatchNorm2d as a timm ``norm_layer`` (timm also passes device and dtype)."""
    return FrozenBatchNorm2d(num_features, **kwargs).to(device=device, dtype=dtype)


def freeze_stages(body: nn.Module, trainable_stages: int) -> None:
    """Trains the last ``trainable_stages`` of the 4 stages of a timm body; 5 also trains the stem.

    Stages are the last four modules of timm's ``feature_info`` (``layer1``..``layer4`` of a ResNet,
    ``layers.0``..``layers.3`` of a Swin); the stem is everything else (``conv1``/``bn1``,
    ``patch_embed``), as torchvision's ``trainable_backbone_layers``.
    """
    if trainable_stages >= 5:
        return
    trained = [info["module"] for info in body.feature_info[-4:]][4 - trainable_stages:]
    for name, param in body.named_parameters():
        if not any(name.startswith(stage + ".") for stage in trained):
            param.requires_grad_(False)
