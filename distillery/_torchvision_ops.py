"""Make `import torchvision` (and so `import timm`) work with a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Against a CPU torch their compiled extension fails to load, and
torchvision's meta registrations then call `torch.library.register_fake("torchvision::nms")` on an operator
that was never defined, so the import raises `operator torchvision::nms does not exist`
(pytorch/vision#9085). Declaring the two schemas first lets the import finish; the Python parts we use
(transforms, models) work, the compiled ones (`ops.nms`, `io.decode_*`) stay unavailable, which is why
images are decoded with PIL. On a CUDA or ROCm torch the real extension loads and this does nothing.
"""

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def register_missing_op_schemas() -> None:
    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", _SCHEMA)
        except RuntimeError:  # already defined: torchvision's own library loaded, or we ran before
            pass


register_missing_op_schemas()
