"""Teachers and students as a plan sees them: architectures built on the meta device (no weights, no memory),
probed once for token width, patch grid and FLOPs; and where each teacher's pretrained weights are."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from distillery.apps.experiments.definition import ExperimentError, MissingInput


@dataclass(frozen=True)
class ModelGeometry:
    arch: str  # the timm architecture (the pretrained config's, for arch.tag)
    input_size: tuple[int, int]
    dim: int
    grid: tuple[int, int]
    gflops: float  # one forward of one image (2 x multiply-adds, torch's FlopCounterMode)


def probe(model, input_size: tuple[int, int]) -> tuple[int, tuple[int, int], float]:
    """Token width, patch grid and GFLOPs of one forward, on the device the model is on (meta: free)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distillery.models.teachers import _grid

    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = model.forward_features(torch.zeros(1, 3, *input_size, device=device))
    if features.ndim == 4:  # a convolutional map: its positions are the patch tokens, as Teacher.forward reads them
        dim, grid = int(features.shape[1]), (int(features.shape[2]), int(features.shape[3]))
    else:
        dim = int(features.shape[-1])
        grid = _grid(model, int(features.shape[1]) - int(getattr(model, "num_prefix_tokens", 0)))
    return dim, grid, counter.get_total_flops() / 1e9


def architecture(name: str, size: int | None = None, cache_dir: str | None = None, **model_args) -> ModelGeometry:
    """The geometry of `name` (timm `arch.tag`, `hf-hub:org/repo` or `local-dir:PATH`), built without weights.

    `size` overrides the input size as `spec@SIZE` does; otherwise the pretrained config's input size is used,
    as a Teacher does. A registry name's tag is checked, then the bare architecture is built, so the tags of one
    architecture share a build. hf-hub configs come from the local Hugging Face cache (`cache_dir`), never fetched."""
    import timm

    if name.startswith(("hf-hub:", "local-dir:")):
        return _build(name, (size, size) if size else None, cache_dir, json.dumps(model_args, sort_keys=True))
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        similar = timm.list_models(f"*{arch.split('_')[0]}*", pretrained=True)[:6]
        raise ExperimentError(f"{arch!r} is not a timm architecture; similar pretrained names: {', '.join(similar)}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:  # timm: "Invalid pretrained tag (...) for ..."
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ExperimentError(f"timm has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags)}") from error
    input_size = (size, size) if size else tuple(cfg.input_size[1:]) if cfg and "img_size" not in model_args else None
    return _build(arch, input_size, None, json.dumps(model_args, sort_keys=True))


@lru_cache(maxsize=None)
def _build(name: str, input_size: tuple[int, int] | None, cache_dir: str | None, model_args: str) -> ModelGeometry:
    """Build on the meta device and probe one forward; with no input size, at the model's own."""
    import timm
    import torch

    kwargs = json.loads(model_args) | ({"img_size": input_size} if input_size else {})
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, cache_dir=cache_dir, **kwargs)
    if input_size is None:
        embed = getattr(model, "patch_embed", None)
        input_size = tuple(embed.img_size) if embed is not None else tuple(model.pretrained_cfg["input_size"][1:])
    dim, grid, gflops = probe(model, input_size)
    return ModelGeometry(model.pretrained_cfg.get("architecture") or name, tuple(input_size), dim, grid, gflops)


@dataclass(frozen=True)
class PlannedTeacher:
    spec: str  # as the experiment names it
    name: str  # its directory name in caches and eval results
    run_spec: str  # what the commands pass: the spec, or the local-dir found under WEIGHTS=
    geometry: ModelGeometry


def plan_teacher(spec: str, weights: Path | None, where: str) -> PlannedTeacher:
    """Check a teacher spec and read its architecture without its weights; a teacher found as a timm local-dir
    under WEIGHTS=/<teacher name>/ runs from there.

    Raises ExperimentError for a spec that cannot work (unknown architecture or tag, missing local-dir) and
    MissingInput for an hf-hub config that is not in the local cache."""
    from distillery.models.teachers import split_size, teacher_name

    base, size = split_size(spec)
    if "/" in base and not base.startswith(("hf-hub:", "local-dir:")):
        raise ExperimentError(f"{where}: teacher {spec!r} looks like a path: write local-dir:{spec}")
    local = weights / teacher_name(base) if weights else None
    if local is not None and (local / "config.json").exists():
        base = f"local-dir:{local}"
    hub_cache = str(weights / "hub") if weights and not base.startswith("local-dir:") else None
    if base.startswith("local-dir:"):
        directory = Path(base.removeprefix("local-dir:"))
        missing = [f for f in ("config.json", "model.safetensors") if not (directory / f).exists()]
        if missing:
            raise ExperimentError(f"{where}: teacher {spec!r}: no {missing[0]} in {directory} (timm save_for_hf layout)")
    try:
        geometry = architecture(base, size, hub_cache)
    except OSError as error:  # huggingface_hub's LocalEntryNotFoundError in offline mode
        raise MissingInput(f"{where}: teacher {spec!r}: its config.json is not in the Hugging Face cache "
                           f"{hub_cache or _hub_cache()} (offline); will need WEIGHTS=DIR holding it") from error
    except ExperimentError as error:
        raise ExperimentError(f"{where}: teacher {spec!r}: {error}") from error
    return PlannedTeacher(spec, teacher_name(spec), base + (f"@{size}" if size else ""), geometry)


def locate_weights(teacher: PlannedTeacher, weights: Path | None) -> str:
    """Where the teacher's pretrained weights are on this machine; MissingInput if nowhere timm would look."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    from distillery.models.teachers import split_size, teacher_name

    base = split_size(teacher.run_spec)[0]
    if base.startswith("local-dir:"):
        return base
    local_dir = f"{teacher_name(base)}/ as a timm local-dir"
    if base.startswith("hf-hub:"):
        repo = base.removeprefix("hf-hub:")
    else:
        cfg = timm.models.get_pretrained_cfg(base)
        repo = cfg.hf_hub_id if cfg else None
        if not repo:
            raise MissingInput(f"teacher {teacher.spec!r}: its weights come from {cfg.url if cfg else 'nowhere'}, not the "
                               f"Hugging Face hub; will need WEIGHTS=DIR holding {local_dir}")
    cache = str(weights / "hub") if weights else _hub_cache()
    for filename in ("model.safetensors", "pytorch_model.bin"):  # what timm's hub loader looks for, in its order
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(found, str):
            return found
    raise MissingInput(f"teacher {teacher.spec!r}: weights of {repo} are not in the Hugging Face cache {cache}; will need "
                       f"WEIGHTS=DIR, an HF_HOME holding hub/ or a directory holding {local_dir}")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
