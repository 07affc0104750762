"""DAVIS-2017 semi-supervised video object segmentation: label propagation on frozen patch features, as DINO's
`eval_video_segmentation.py` does it, scored as the `davis2017-evaluation` package scores it.

Propagation (DINO): each frame's patch tokens (last block, after the final norm) are L2-normalised; a target
patch's affinity to a source patch is exp(cos / 0.1), kept only within +-12 patches in row and column, then
only the top 5 over all context frames together, renormalised to sum 1; the new soft label is the weighted
sum of the sources' labels. The context is the first frame (its one-hot annotation) and the 7 most recent
frames with their soft predictions. A frame's prediction is the soft label upsampled bilinearly by the
stride, each channel min-max normalised, argmax, resized nearest to the frame's size.

Scoring (davis2017-evaluation, semi-supervised): the first and last frames are left out; J is the per-object
IoU (1 when the union is empty); F the boundary F-measure with tolerance ceil(0.008 x the image diagonal), the
boundaries from `seg2bmap` and matched through a disk dilation (scipy here: the same pixels as its cv2 +
skimage code); per object the mean over frames, the recall (share above 0.5) and the decay (first quarter's
mean minus the last's); J-Mean and F-Mean average the objects of all sequences, J&F is their mean.

Layout (the DAVIS-2017 release): `JPEGImages/480p/<seq>/%05d.jpg`, `Annotations/480p/<seq>/%05d.png`
(indexed PNGs: 0 background, 1..n objects, 255 void), `ImageSets/2017/<split>.txt`.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_dilation

from distillery.config import ConfigError
from distillery.data.imagefolder import read_listing
from distillery.errors import DistilleryError
from distillery.evaluate.features import model_device, patch_grid


@dataclass(frozen=True)
class DavisSettings:
    n_last_frames: int = 7  # DINO eval_video_segmentation.py defaults
    neighbourhood: int = 12  # size_mask_neighborhood, in patches
    topk: int = 5
    temperature: float = 0.1
    short_side: int = 480  # frames: short side to this, long side floored to a multiple of `multiple`
    multiple: int = 64
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.228, 0.224, 0.225)  # DINO's (0.228, not 0.229)
    split: str = "val"
    resolution: str = "480p"

    def __post_init__(self) -> None:
        if min(self.n_last_frames, self.topk, self.short_side, self.multiple) < 1 or self.neighbourhood < 0:
            raise ConfigError("davis: n_last_frames, topk, short_side and multiple must be positive")


# ------------------------------------------------------------------------------------------------ the data

@dataclass(frozen=True)
class Sequence:
    name: str
    frames: list[Path]
    annotations: list[Path]  # one per frame


def read_sequences(root: str | Path, settings: DavisSettings = DavisSettings()) -> list[Sequence]:
    """The sequences of `ImageSets/2017/<split>.txt`, each checked: a frame for every annotation and back."""
    root = Path(root)
    names = read_listing(root / "ImageSets" / "2017" / f"{settings.split}.txt", "DAVIS-2017", "sequence")
    sequences = []
    for name in names:
        frames_dir = root / "JPEGImages" / settings.resolution / name
        masks_dir = root / "Annotations" / settings.resolution / name
        frames = sorted(frames_dir.glob("*.jpg"))
        masks = sorted(masks_dir.glob("*.png"))
        if not frames:
            raise DistilleryError(f"{frames_dir}: no frames for sequence {name}")
        frame_ids, mask_ids = [p.stem for p in frames], [p.stem for p in masks]
        if frame_ids != mask_ids:
            missing = sorted(set(frame_ids) ^ set(mask_ids))[0]
            where = masks_dir if missing in frame_ids else frames_dir
            raise DistilleryError(f"{where}: frame {missing} of sequence {name} has no counterpart "
                                  f"({len(frames)} frames, {len(masks)} annotations)")
        if frame_ids != [f"{i:05d}" for i in range(len(frames))]:
            raise DistilleryError(f"{frames_dir}: frames must be numbered 00000, 00001, ... without gaps")
        sequences.append(Sequence(name, frames, masks))
    return sequences


def read_annotation(path: Path, size: tuple[int, int] | None = None, objects: int | None = None) -> np.ndarray:
    """An indexed annotation PNG as uint8 [H, W]; checked against the frame size and the object count."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DistilleryError(f"{path}: annotation mode {image.mode}, expected an indexed (P) or L PNG")
            mask = np.array(image)
    except OSError as error:
        raise DistilleryError(f"{path}: unreadable annotation ({error})") from error
    if size is not None and mask.shape != (size[1], size[0]):
        raise DistilleryError(f"{path}: annotation is {mask.shape[1]}x{mask.shape[0]}, its frame {size[0]}x{size[1]}")
    if objects is not None:
        unknown = sorted(set(np.unique(mask).tolist()) - set(range(objects + 1)) - {255})
        if unknown:
            raise DistilleryError(f"{path}: object index {unknown[0]} is not in the first frame (1..{objects})")
    return mask


def frame_size(width: int, height: int, settings: DavisSettings) -> tuple[int, int]:
    """(W, H) of a resized frame: the short side to `short_side`, the long one floored to a multiple."""
    short, long = min(width, height), max(width, height)
    scaled_long = int(settings.short_side * long / short / settings.multiple) * settings.multiple
    scaled_long = max(settings.multiple, scaled_long)
    return (scaled_long, settings.short_side) if width >= height else (settings.short_side, scaled_long)


# ------------------------------------------------------------------------------------------------ propagation

def neighbourhood_mask(grid: tuple[int, int], radius: int) -> torch.Tensor:
    """[h*w source, h*w target]: 1 where the source lies within `radius` patches in row and column."""
    h, w = grid
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return (near_rows & near_cols).float()


def propagate(features: list[torch.Tensor], first_labels: torch.Tensor, grid: tuple[int, int],
              settings: DavisSettings = DavisSettings()) -> list[torch.Tensor]:
    """Soft labels [C, h, w] for every frame from the first frame's one-hot `first_labels` [C, h, w].

    `features`: per frame, patch tokens [h*w, D] on `grid` (row-major). Frame 0's labels are returned as given."""
    c = first_labels.shape[0]
    normed = [F.normalize(f.float(), dim=-1) for f in features]
    local = neighbourhood_mask(grid, settings.neighbourhood).to(normed[0].device)
    first = (normed[0], first_labels.reshape(c, -1).T.float())
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = [first_labels.float()]
    for target in normed[1:]:
        context = [first, *queue]
        sources = torch.cat([f for f, _ in context])  # [n * h*w, D]
        labels = torch.cat([lab for _, lab in context])  # [n * h*w, C]
        affinity = torch.exp(sources @ target.T / settings.temperature)  # [sources, targets]
        affinity = affinity * local.repeat(len(context), 1)
        top = torch.topk(affinity, k=min(settings.topk, affinity.shape[0]), dim=0).values.min(dim=0).values
        affinity = torch.where(affinity < top[None, :], torch.zeros_like(affinity), affinity)
        affinity = affinity / affinity.sum(dim=0, keepdim=True)
        label = affinity.T @ labels  # [targets, C]
        out.append(label.T.reshape(c, *grid))
        queue.append((target, label))
        if len(queue) > settings.n_last_frames:
            queue.pop(0)
    return out


def hard_mask(soft: torch.Tensor, stride: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A soft label [C, h, w] to an index mask of `size` (W, H): upsample by the stride (bilinear), min-max
    normalise each channel with a positive maximum (DINO's norm_mask), argmax, nearest resize."""
    up = F.interpolate(soft[None], scale_factor=stride, mode="bilinear", align_corners=False)[0]
    for channel in range(up.shape[0]):
        values = up[channel]
        if values.max() > 0:
            values = values - values.min()
            up[channel] = values / values.max()
    index = up.argmax(0).to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(index, "L").resize(size, Image.NEAREST))


def one_hot(mask: np.ndarray, grid: tuple[int, int], objects: int) -> torch.Tensor:
    """The first frame's annotation, nearest-resized to the patch grid, as one-hot [objects + 1, h, w]."""
    small = np.array(Image.fromarray(mask, "L").resize((grid[1], grid[0]), Image.NEAREST)).astype(np.int64)
    small[small > objects] = 0  # void (255) counts as background, as DINO's one-hot of the first frame does
    return F.one_hot(torch.from_numpy(small), objects + 1).permute(2, 0, 1).float()


# ------------------------------------------------------------------------------------------------ scoring

def iou(annotation: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """J per frame for boolean masks [..., H, W]: 1 where the union is empty (db_eval_iou)."""
    inter = np.sum(annotation & segmentation, axis=(-2, -1))
    union = np.sum(annotation | segmentation, axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask, as davis2017-evaluation's `_seg2bmap` marks them."""
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius  # skimage.morphology.disk


def boundary_f(annotation: np.ndarray, segmentation: np.ndarray, bound_th: float = 0.008) -> float:
    """F for one frame: boundary precision and recall within ceil(bound_th x diagonal) pixels."""
    radius = bound_th if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(*annotation.shape)))
    fg, gt = seg2bmap(segmentation), seg2bmap(annotation)
    fg_dilated, gt_dilated = binary_dilation(fg, _disk(radius)), binary_dilation(gt, _disk(radius))
    n_fg, n_gt = fg.sum(), gt.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision, recall = (fg & gt_dilated).sum() / n_fg, (gt & fg_dilated).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, recall (share above 0.5) and decay of one object's per-frame values (db_statistics)."""
    edges = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.int64)
    bins = [values[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return {"mean": float(np.nanmean(values)), "recall": float(np.nanmean(values > 0.5)),
            "decay": float(np.nanmean(bins[0]) - np.nanmean(bins[3]))}


def score_sequence(annotations: list[np.ndarray], predictions: list[np.ndarray], objects: int) -> dict[str, Any]:
    """Per object J and F statistics over the frames between the first and the last."""
    gt = np.stack(annotations)[1:-1]
    pred = np.stack(predictions)[1:-1]
    out = {}
    for obj in range(1, objects + 1):
        gt_obj, pred_obj = gt == obj, pred == obj
        j = iou(gt_obj, pred_obj)
        f = np.array([boundary_f(a, p) for a, p in zip(gt_obj, pred_obj, strict=True)])
        out[str(obj)] = {"J": statistics(j), "F": statistics(f)}
    return out


def global_scores(per_sequence: dict[str, dict[str, Any]]) -> dict[str, float]:
    """J-Mean, F-Mean and their recalls and decays over all objects of all sequences, and J&F-Mean."""
    objects = [o for seq in per_sequence.values() for o in seq.values()]
    if not objects:
        raise DistilleryError("davis: no object to score (every first-frame annotation is empty)")
    out = {f"{m}-{stat.capitalize()}": float(np.mean([o[m][stat] for o in objects]))
           for m in ("J", "F") for stat in ("mean", "recall", "decay")}
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return out


# ------------------------------------------------------------------------------------------------ the task

def segment_sequence(teacher, sequence: Sequence, settings: DavisSettings,
                     batch_size: int = 16) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(annotations, predictions, objects) of one sequence: the frames' patch features and the propagation."""
    with Image.open(sequence.frames[0]) as first:
        size = first.size
    annotations = [read_annotation(sequence.annotations[0], size)]
    objects = int(annotations[0][annotations[0] != 255].max(initial=0))
    annotations += [read_annotation(p, size, objects) for p in sequence.annotations[1:]]
    width, height = frame_size(*size, settings)
    grid = patch_grid(teacher, height, width)
    mean = torch.tensor(settings.mean).view(3, 1, 1)
    std = torch.tensor(settings.std).view(3, 1, 1)
    features: list[torch.Tensor] = []
    for start in range(0, len(sequence.frames), batch_size):
        pixels = []
        for path in sequence.frames[start:start + batch_size]:
            with Image.open(path) as image:
                if image.size != size:
                    raise DistilleryError(f"{path}: frame is {image.size[0]}x{image.size[1]}, frame 0 {size[0]}x{size[1]}")
                frame = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR), np.float32) / 255
            pixels.append((torch.from_numpy(frame).permute(2, 0, 1) - mean) / std)
        tokens = teacher(torch.stack(pixels).to(model_device(teacher))).patch
        features += list(tokens.cpu())
    soft = propagate(features, one_hot(annotations[0], grid, objects), grid, settings)
    stride = (height / grid[0], width / grid[1])
    predictions = [annotations[0]] + [hard_mask(s, stride, size) for s in soft[1:]]  # frame 0 is the given mask
    return annotations, predictions, objects


def davis_scores(teacher, sequences: list[Sequence], settings: DavisSettings = DavisSettings(),
                 masks_out: Path | None = None, progress=None) -> dict[str, Any]:
    """Global and per-sequence J/F of a model on `read_sequences`' sequences; with `masks_out`, the predicted PNGs too."""
    per_sequence = {}
    for sequence in sequences:
        if len(sequence.frames) < 3:
            raise DistilleryError(f"{sequence.frames[0].parent}: {len(sequence.frames)} frames; scoring leaves out "
                                  "the first and the last, so a sequence needs at least 3")
        annotations, predictions, objects = segment_sequence(teacher, sequence, settings)
        per_sequence[sequence.name] = score_sequence(annotations, predictions, objects)
        if masks_out is not None:
            directory = Path(masks_out) / sequence.name
            directory.mkdir(parents=True, exist_ok=True)
            for path, mask in zip(sequence.annotations, predictions, strict=True):
                Image.fromarray(mask, "L").save(directory / path.name)
        if progress:
            progress(sequence.name)
    return {"global": global_scores(per_sequence), "sequences": per_sequence}


HEADLINE = ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall")


def davis_result(teacher, name: str, spec: str, root: str | Path, settings: DavisSettings = DavisSettings(),
                 masks_out: Path | None = None):
    """The davis TaskResult of one model (what `eval davis` and the suite's davis task write)."""
    from distillery.console import progress_bar
    from distillery.evaluate.results import TaskResult, percent

    sequences = read_sequences(root, settings)
    with progress_bar() as progress:
        task = progress.add_task(f"davis {name}", total=len(sequences))
        scores = davis_scores(teacher, sequences, settings, masks_out, progress=lambda _: progress.advance(task))
    data = {"davis": {"root": str(root), "split": settings.split,
                      "frames": {s.name: len(s.frames) for s in sequences}}}
    return TaskResult("davis", {name: {"spec": spec, "fingerprint": teacher.fingerprint()}}, data,
                      dataclasses.asdict(settings), scores, ("model", *HEADLINE),
                      [(name, *(percent(scores["global"][k]) for k in HEADLINE))])


def davis_task(spec: str, root: str | Path, settings: DavisSettings = DavisSettings(), out: Path | None = None,
               masks_out: Path | None = None, device: str | None = None):
    """`distillery eval davis`: J&F of one model, written to OUT (default results/<model>/davis.json)."""
    from distillery.evaluate.features import load_model
    from distillery.evaluate.results import default_path, save_result

    teacher = load_model(spec, device, any_size=True)
    result = davis_result(teacher, teacher.name, spec, root, settings, masks_out)
    return result, save_result(result, out or default_path(teacher.name, "davis"))
