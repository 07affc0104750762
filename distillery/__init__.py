"""distillery: cache frozen-teacher features once, then distil ViT students from them (SeFA, TinTeM, UNIC)."""

from distillery import _torchvision_ops  # noqa: F401  (must run before anything imports torchvision or timm)
from distillery.models import convstem  # noqa: F401  (registers the convolutional-stem ViTs with timm)

__version__ = "0.1.0"
