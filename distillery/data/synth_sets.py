"""The embedded evaluation sets beside the still splits of `distillery data synth`: dense (DAVIS, VOC) and
robustness (V2, R, C, ImageNet-9 analogues) and transfer (held-out classes). Each module says what its set
holds."""

from __future__ import annotations

from pathlib import Path


TRANSFER_SET = "transfer/novel-shapes"  # under the synth root: train/ and val/
ROBUSTNESS_PARTS = ("val-v2", "val-r", "val-c", "val-9")  # written together by synth_robust
EVALUATION_PARTS = ("davis", "seg", *ROBUSTNESS_PARTS, TRANSFER_SET)


def generate_evaluation_sets(out: str | Path, seed: int = 0, size: int = 32, davis_sequences: int = 6,
                             seg_train: int = 400, seg_val: int = 100, robustness_images: int = 200,
                             transfer_train: int = 1000, transfer_val: int = 500) -> dict[str, int]:
    """OUT/davis (DAVIS-2017 layout), OUT/seg (VOC layout), OUT/val-v2, val-r, val-c, val-9 (their ImageNet
    counterparts' layouts; val-c's baseline reads OUT/train, so the still splits come first) and
    OUT/transfer/novel-shapes (train/ and val/ of classes of their own). A count of 0 leaves a set out, and a
    set already there is kept (so a data set written before a set was added gains just that set). Returns what
    was written, by part."""
    from distillery.data.synth import SynthConfig, generate_transfer
    from distillery.data.synth_robust import RobustConfig, generate_robustness_sets
    from distillery.data.synth_seg import SegConfig, generate_segmentation
    from distillery.data.synth_video import VideoConfig, generate_davis

    out = Path(out)
    counts = {}
    missing = lambda *parts: not all((out / part).exists() for part in parts)  # noqa: E731
    if davis_sequences and missing("davis"):
        counts["davis (frames)"] = generate_davis(VideoConfig(seed=seed, size=size, sequences=davis_sequences),
                                                  out / "davis")
    if (seg_train or seg_val) and missing("seg"):
        counts["seg"] = generate_segmentation(SegConfig(seed=seed, size=size, train=seg_train, val=seg_val), out / "seg")
    if robustness_images and missing(*ROBUSTNESS_PARTS):
        counts.update(generate_robustness_sets(RobustConfig(seed=seed, size=size, images=robustness_images), out,
                                               out / "train"))
    if (transfer_train or transfer_val) and missing(TRANSFER_SET):
        counts[TRANSFER_SET] = generate_transfer(SynthConfig(seed=seed, size=size), out / TRANSFER_SET,
                                                 transfer_train, transfer_val)
    return counts
