"""distillery: cache frozen-teacher features once, then distil ViT students from them (SeFA, TinTeM, UNIC)."""

import os

# Never reach the network at run time: a missing pretrained file must fail at once, not after a minute of
# retries. A user who wants timm to download can set HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from distillery import _torchvision_ops  # noqa: E402,F401  (must run before anything imports torchvision or timm)
from distillery.models import convstem  # noqa: E402,F401  (registers the convolutional-stem ViTs with timm)

__version__ = "0.1.0"
