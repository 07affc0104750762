"""ViTs with a convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"),
registered as timm models so that they are created, exported and loaded through timm like any other.

The stem replaces the patchify convolution with stride-2 3x3 convolutions (GroupNorm, ReLU) down to the
patch size, then a 1x1 projection to the width; the rest is timm's VisionTransformer. Xiao et al. find
this optimises faster and more stably at the same cost, which is what a from-scratch student needs on a
few thousand 32-px images in a CPU budget: the embedded world's students use `vit_convstem_tiny_patch4_32`
(an 8 x 8 token grid at 32 px). `stem_blocks=N` adds N residual blocks after each stride-2 convolution, a
hybrid stem in the manner of timm's ResNet-ViT hybrids; the demo's students take one (BENCHMARKS.md, "The
embedded world", measures what it buys). timm has no such stem for small patch sizes (its hybrids stride
16 or 32).
"""

from __future__ import annotations

import math
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from distillery.config import ConfigError


class ResidualBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions and the identity) with GroupNorm, at a fixed width."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(1, width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(1, width))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with its projection replaced by a convolutional stem of the same total stride, with
    `stem_blocks` residual blocks after each stride-2 convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True, stem_blocks: int = 0,
                 **kwargs):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         **kwargs)
        stride = self.patch_size[0]
        steps = int(math.log2(stride))
        if self.patch_size[0] != self.patch_size[1] or 2 ** steps != stride or steps < 1:
            raise ConfigError(f"a convolutional stem needs a square power-of-two patch size, got {self.patch_size}")
        layers, channels = [], in_chans
        for step in range(steps):
            width = max(16, embed_dim // 2 ** (steps - 1 - step))
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, width),
                       nn.ReLU(inplace=True)]
            layers += [ResidualBlock(width) for _ in range(stem_blocks)]
            channels = width
        layers.append(nn.Conv2d(channels, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)


# timm reads a module's default_cfgs when its models register, so this comes before them.
default_cfgs = generate_default_cfgs({
    "vit_convstem_tiny_patch4_32": {"url": "", "num_classes": 0, "input_size": (3, 32, 32), "crop_pct": 0.875,
                                    "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
                                    "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj.0",
                                    "classifier": "head"},
})


def _create(variant: str, pretrained: bool = False, stem_blocks: int = 0, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                embed_layer=partial(ConvStemPatchEmbed, stem_blocks=stem_blocks), **kwargs)


@register_model
def vit_convstem_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """64 wide, 4 blocks, 2 heads, 8 x 8 tokens at 32 px: the embedded world's student."""
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
    return _create("vit_convstem_tiny_patch4_32", pretrained, **{**args, **kwargs})
