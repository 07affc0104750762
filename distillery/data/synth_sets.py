"""The embedded evaluation sets beside the still splits of `distillery data synth`: dense (DAVIS, VOC) and
robustness (V2, R, C, ImageNet-9 analogues). Each module says what its set holds."""

from __future__ import annotations

from pathlib import Path


def generate_evaluation_sets(out: str | Path, seed: int = 0, size: int = 32, davis_sequences: int = 6,
                             seg_train: int = 400, seg_val: int = 100, robustness_images: int = 200) -> dict[str, int]:
    """OUT/davis (DAVIS-2017 layout), OUT/seg (VOC layout) and OUT/val-v2, val-r, val-c, val-9 (their ImageNet
    counterparts' layouts; val-c's baseline reads OUT/train, so the still splits come first). A count of 0
    leaves a set out. Returns what was written, by part."""
    from distillery.data.synth_robust import RobustConfig, generate_robustness_sets
    from distillery.data.synth_seg import SegConfig, generate_segmentation
    from distillery.data.synth_video import VideoConfig, generate_davis

    out = Path(out)
    counts = {}
    if davis_sequences:
        counts["davis (frames)"] = generate_davis(VideoConfig(seed=seed, size=size, sequences=davis_sequences),
                                                  out / "davis")
    if seg_train or seg_val:
        counts["seg"] = generate_segmentation(SegConfig(seed=seed, size=size, train=seg_train, val=seg_val), out / "seg")
    if robustness_images:
        counts.update(generate_robustness_sets(RobustConfig(seed=seed, size=size, images=robustness_images), out,
                                               out / "train"))
    return counts
