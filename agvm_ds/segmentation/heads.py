"""Decode heads of dense predictors: Semantic FPN (Kirillov et al. 2019), UperNet (Xiao et al. 2018), FCN.

Each head maps a list of NCHW feature maps (finest first, stride 4 to 32) to class logits at
stride 4 (Semantic FPN, UperNet) or at its input's stride (FCN). The layouts follow mmseg's
``FPNHead``, ``UPerHead`` and ``FCNHead``, so published recipes (channels, dropout, loss
weights) carry over.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvNormAct", "FCNHead", "NormLayer", "SemanticFPNHead", "UPerHead", "group_norm"]

NormLayer = Callable[[int], nn.Module]
"""A norm layer factory: channels -> module (``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, :func:`group_norm`)."""


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when ``channels`` is not a multiple of 32), as Panoptic FPN's heads."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConvNormAct(nn.Sequential):
    """conv (no bias: the norm has one) -> norm -> ReLU, mmseg's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )


def _upsample_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class _Classifier(nn.Sequential):
    """Dropout (skipped at 0) then a 1x1 conv to the class logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
                         nn.Conv2d(in_channels, num_classes, 1))


class SemanticFPNHead(nn.Module):
    """The semantic branch of Panoptic FPN: each pyramid level is brought to stride 4 and summed.

    Level ``i`` (stride ``4 * 2**i``) goes through ``max(i, 1)`` conv3x3-norm-ReLU blocks, each but
    the level-0 one followed by a 2x bilinear upsampling; the sum is classified by a 1x1 conv.
    GroupNorm by default, as the paper and detectron2 (batch-size independent, so it trains with
    one image per device); mmseg's ``FPNHead`` uses SyncBN and adds dropout 0.1 before the classifier.

    Args:
        in_channels: width of every pyramid level (the FPN's).
        channels: width of the head (128 in the paper and mmseg).
        num_levels: pyramid levels used, finest first (4: P2-P5).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        num_levels: int = 4,
        dropout: float = 0.1,
        norm_layer: NormLayer = group_norm,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(num_levels):
            blocks: list[nn.Module] = []
            for k in range(max(level, 1)):
                blocks.append(ConvNormAct(in_channels if k == 0 else channels, channels, 3, norm_layer))
                if level > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:]):
            # the 2x steps land on the finest map's size only when the input is a multiple of 32
            out = out + _upsample_to(head(feature), out)
        return self.classifier(out)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pooling pyramid: adaptive average pools at ``pool_scales``, 1x1 conv each, upsampled back."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm_layer: NormLayer) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels, 1, norm_layer))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_upsample_to(stage(x), x) for stage in self.stages]


class UPerHead(nn.Module):
    """UperNet's decode head (mmseg ``UPerHead``): a pooling pyramid on C5 and an FPN over C2-C5.

    C5 with its pooled context (scales 1, 2, 3, 6) is fused by a conv3x3 into the top level; C2-C4
    get 1x1 laterals; a top-down pass adds each coarser level into the finer one, a conv3x3 smooths
    every level but the top, all levels are upsampled to stride 4, concatenated, fused by a conv3x3
    and classified. Norm: BatchNorm by default (mmseg: SyncBN). In training the pooling pyramid's
    scale-1 branch sees one value per channel and image, so a BatchNorm there needs at least two
    images per batch (or per synchronised group).

    Args:
        in_channels: widths of C2-C5.
        channels: width of the head (512 in mmseg's recipes).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        *lateral_in, top_in = in_channels
        self.ppm = PyramidPoolingModule(top_in, channels, pool_scales, norm_layer)
        self.bottleneck = ConvNormAct(top_in + len(pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm_layer) for c in lateral_in)
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm_layer) for _ in lateral_in)
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm_layer)
        self.classifier = _Classifier(channels, num_classes, dropout)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *finer, top = features
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, finer)]
        laterals.append(self.bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _upsample_to(laterals[i], laterals[i - 1])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_upsample_to(out, outs[0]) for out in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(nn.Sequential):
    """The auxiliary head of mmseg's UperNet recipes (``FCNHead``, one conv): conv3x3-norm-ReLU,
    dropout, 1x1 classifier, on C4. It adds a deeper supervision signal to the backbone; its logits
    are not used for prediction.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__(ConvNormAct(in_channels, channels, 3, norm_layer), _Classifier(channels, num_classes, dropout))
