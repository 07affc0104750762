"""The training loop. It knows no method by name: a method (train/methods/) declares its views, heads, EMA
and losses, and the loop does the rest: data, optimisation, schedules, DDP, logging and checkpoints.

AdamW with timm's parameter groups (no decay on norms, biases, position embeddings and tokens), LR linearly
scaled with the global batch, warmup then cosine; optional cosine weight-decay schedule; gradient
clipping; bf16 autocast on CUDA, fp32 on CPU. A checkpoint holds everything a run depends on (model,
heads, optimizer, EMA, method buffers, RNG states and each data worker's stream position), so `--resume`
continues exactly: on CPU the losses after a resume equal those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from distillery.cache.store import CacheError, CacheStore, identity_differences
from distillery.console import console, is_main_process, progress_bar
from distillery.data.shards import ShardSet, fingerprint_differences
from distillery.data.views import ViewConfig, normalize
from distillery.errors import DistilleryError
from distillery.models.students import Student, initial_student, load_init
from distillery.models.teachers import create_teacher
from distillery.train import checkpoint as ckpt
from distillery.config import ConfigError, read_yaml
from distillery.train.config import RESUMABLE_CHANGES, TrainConfig, load_saved, resolve, save
from distillery.train.curves import METRICS_FILE, TensorBoardLog, plot_run, read_metrics, summary_writer_class
from distillery.train.data import Position, TeacherViews, TrainStream, make_loader
from distillery.train.distributed import DistInfo, any_rank, barrier, gather_objects, init_distributed
from distillery.train.ema import ModelEma
from distillery.train.methods import Method, MethodContext, TeacherInfo, create_method, method_class
from distillery.train.schedules import warmup_cosine
from distillery.train.targets import TargetSource, cached_stats, online_stats

CONFIG_FILE = "config.yaml"
IMAGE_KEYS = ("student", "crops/")  # uint8 pixels the loop normalises with the student's mean/std


class TrainingError(DistilleryError):
    pass


class TrainModule(nn.Module):
    """Student and method heads as one module, so DDP syncs both and checkpoints hold both."""

    def __init__(self, student: Student, method: Method):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, batch: dict[str, Any], step: int, ema: nn.Module | None) -> dict[str, torch.Tensor]:
        return self.method(self.student, batch, step, ema)

    def no_weight_decay(self) -> set[str]:
        return {f"student.{name}" for name in self.student.no_weight_decay()}


@dataclasses.dataclass
class Teachers:
    """What the run knows of its teachers: infos for the method, how views are drawn, how targets are made."""

    infos: tuple[TeacherInfo, ...] = ()
    views: TeacherViews | None = None
    targets: TargetSource | None = None


def _setup_teachers(config: TrainConfig, method_cls: type[Method], shard_set: ShardSet, student_grid: tuple[int, int],
                    device: torch.device) -> Teachers:
    if not method_cls.uses_teachers:
        if config.cache or config.teachers:
            raise ConfigError(f"method {config.method} trains without teachers; drop --cache/--teacher")
        return Teachers()
    if config.cache:
        stores: dict[str, CacheStore] = {}
        for url in config.cache_urls:
            stores[url] = _usable_store(url, config, shard_set, next(iter(stores.values()), None))
        chosen = _chosen_teachers(stores, config.cache_teachers)
        names = [t.name for _, t in chosen]
        infos = tuple(TeacherInfo(t.name, t.dim, t.stored_grid) for _, t in chosen)
        first = next(iter(stores.values()))
        reading = tuple((url, tuple(t.name for u, t in chosen if u == url)) for url in stores)
        views = TeacherViews(first.num_views, first.identity["views"]["seed"],
                             ViewConfig.from_dict(first.identity["views"]["config"]),
                             stores=tuple(entry for entry in reading if entry[1]))
        stats = ({t.name: stores[url].stats(t.name) for url, t in chosen} if method_cls.standardize_targets else None)
        return Teachers(infos, views, TargetSource(names, [t.stored_grid for _, t in chosen], student_grid, stats, device,
                                                   dtype={t.name: stores[url].dtype for url, t in chosen}))
    if not config.teachers:
        raise ConfigError(f"method {config.method} learns from teachers: give --cache STORE or --teacher SPEC")
    teachers = [create_teacher(spec, device) for spec in config.teachers]
    names = [t.name for t in teachers]
    view_config = ViewConfig.from_dict(config.view_config)
    views = TeacherViews(config.views, config.view_seed, view_config,
                         online_sizes=tuple(sorted({t.preprocessing.input_size for t in teachers})))
    stats = None
    if method_cls.standardize_targets:
        if config.stats_from:
            store = CacheStore.open(config.stats_from)
            for teacher in teachers:
                if store.teacher(teacher.name).fingerprint != teacher.fingerprint():
                    raise CacheError(f"--stats-from {config.stats_from}: its {teacher.name} has other weights or preprocessing")
            stats = cached_stats(store, names)
        else:
            stats = online_stats(teachers, shard_set, config.stats_samples, view_config, config.view_seed, device)
    infos = tuple(TeacherInfo(t.name, t.embed_dim, t.grid) for t in teachers)
    return Teachers(infos, views, TargetSource(names, [t.grid for t in teachers], student_grid, stats, device, teachers=teachers))


def _usable_store(url: str, config: TrainConfig, shard_set: ShardSet, first: CacheStore | None) -> CacheStore:
    """A complete store of patch tokens for these shards; beside the `first` one, under the same views."""
    store = CacheStore.open(url)
    changed = fingerprint_differences(store.identity["dataset"], shard_set.fingerprint())
    if changed:
        raise CacheError(f"{url} was built from other data than {config.data}: {changed}; rebuild the cache, or "
                         "train on the data it was built from")
    if not store.is_complete:
        raise CacheError(f"{url} is incomplete ({len(store.completed_shards())}/{store.num_shards} shards); "
                         "finish it by re-running cache-teachers")
    if store.manifest["completion"]["num_valid"] == 0:
        raise CacheError(f"{url} has no valid row: every image is undecodable or has a non-finite teacher output "
                         f"({store.manifest['completion'].get('invalid_by_cause', {})})")
    if store.cls_only:
        raise CacheError(f"{url} holds CLS tokens only; {config.method} needs patch tokens too")
    if first is not None:  # stores are joined row by row: each must have drawn the same views of the same images
        differences = identity_differences(first.identity["views"], store.identity["views"], "views")
        if differences:
            raise CacheError(f"{url} and {first.url} cannot be combined: their views differ ({differences[0]}); "
                             "cache each teacher with the same --views, --view-seed and --view-config")
    return store


def _chosen_teachers(stores: dict[str, CacheStore], wanted: list[str]) -> list:
    """(store URL, teacher) for every teacher of the stores, or the named subset in the order given (TinTeM
    from one teacher of a shared cache). A teacher held by two stores is ambiguous."""
    held: dict[str, tuple[str, Any]] = {}
    for url, store in stores.items():
        for teacher in store.teachers:
            if teacher.name in held:
                raise CacheError(f"teacher {teacher.name} is in both {held[teacher.name][0]} and {url}; "
                                 "combine stores of different teachers")
            held[teacher.name] = (url, teacher)
    if not wanted:
        return list(held.values())
    missing = [name for name in wanted if name not in held]
    if missing:
        raise CacheError(f"{', '.join(stores)} hold no teacher {', '.join(missing)}; they hold {', '.join(held)}")
    return [held[name] for name in wanted]


def prepare_batch(batch: dict[str, Any], device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """To the device; the student's pixels to normalised float (teacher pixels stay uint8 for their own normalisation)."""
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.to(device, non_blocking=True)
        out[key] = normalize(value, mean, std) if key.startswith(IMAGE_KEYS) else value
    return out


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int, epochs: int) -> int:
    """The LR warm-up in steps; one as long as the run (a short run with a recipe's 10 epochs would never reach
    its peak LR) is clamped to a tenth of the run, and said so."""
    steps = int(warmup_epochs * steps_per_epoch)
    if steps < total_steps:
        return steps
    clamped = total_steps // 10
    if is_main_process():
        console.print(f"[yellow]warm-up of {warmup_epochs:g} epochs is not shorter than this {epochs}-epoch run; "
                      f"clamped to {clamped} steps (a tenth of the run) so the LR reaches its peak[/]")
    return clamped


class Trainer:
    def __init__(self, config: TrainConfig, dist: DistInfo, resume: bool = False):
        self.config, self.dist = config, dist
        self.run_dir = Path(config.out)
        device = dist.device
        if config.batch_size % (dist.world_size * config.grad_accum_steps):
            raise ConfigError(f"batch_size {config.batch_size} does not split evenly over {dist.world_size} ranks"
                              + (f" x {config.grad_accum_steps} micro-batches" if config.grad_accum_steps > 1 else ""))
        if config.tensorboard:
            summary_writer_class()
        shard_set = ShardSet.open(config.data)
        method_cls = method_class(config.method)
        self.steps_per_epoch = max(1, shard_set.num_samples // config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.end_step = self.total_steps if config.max_steps is None else min(config.max_steps, self.total_steps)
        self.warmup_steps = warmup_steps(config.warmup_epochs, self.steps_per_epoch, self.total_steps, config.epochs)

        self.student = initial_student(config.student, config.student_args, config.seed)  # the same on every rank
        if config.init and not resume:  # a resumed run restores its own weights
            load_init(self.student, config.init)
        with torch.random.fork_rng(devices=[]):  # building teacher models must not move the seeded init of the heads
            self.teachers = _setup_teachers(config, method_cls, shard_set, self.student.grid, device)
        context = MethodContext(
            student_dim=self.student.embed_dim, student_grid=self.student.grid,
            student_size=self.student.preprocessing.input_size, student_depth=self.student.depth,
            teachers=self.teachers.infos, label_classes=shard_set.label_sizes(),
            total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, seed=config.seed,
            rank=dist.rank)
        self.method = create_method(config.method, config.method_config, context)
        self.module = TrainModule(self.student, self.method).to(device)
        heads = self.method.ema_heads()
        self.ema_source = None if heads is None else nn.ModuleDict({"backbone": self.student, **heads})
        self.ema = None if heads is None else ModelEma(self.ema_source)
        self.model = self.module
        if dist.world_size > 1:
            # Buffers (DINO's centre, ...) start equal on every rank and each method all-reduces its own, so
            # they are not broadcast at every forward.
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        self.nominal_wd = max(config.weight_decay, config.weight_decay_end or 0.0)
        groups = param_groups_weight_decay(self.module, self.nominal_wd, no_weight_decay_list=self.module.no_weight_decay())
        self.optimizer = torch.optim.AdamW(groups, lr=config.peak_lr, betas=config.betas)

        self.start_step = 0
        self.num_workers = max(1, config.workers)
        positions: list[Position] = []
        torch.manual_seed(config.seed * 1009 + dist.rank)  # drop-path and other noise differ across ranks
        if resume:
            positions = self._restore()
        self.positions = positions or [Position()] * self.num_workers
        stream = TrainStream(shard_set, self.method.sample_spec(), self.student.preprocessing.input_size,
                             config.batch_size // (dist.world_size * config.grad_accum_steps), config.seed, dist.rank,
                             dist.world_size, self.num_workers, self.teachers.views, positions,
                             first_batch=self.start_step * config.grad_accum_steps, repeats=config.repeated_augmentation)
        self.loader = make_loader(stream, config.workers, config.seed)

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return {"config": self.config.to_dict(), "student_config": self.student.config(),
                "model": self.module.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": gather_objects(rng), "data": {"world_size": self.dist.world_size, "workers": self.num_workers,
                                                    "positions": gather_objects([list(p) for p in self.positions])}}

    def _save(self, step: int) -> Path | None:
        state = self._state()  # every rank takes part in the gathers
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(state, self.run_dir, step, self.config.keep_checkpoints)
        barrier()
        return path

    def _restore(self) -> list[Position]:
        path = ckpt.latest_checkpoint(self.run_dir)
        state = ckpt.load_checkpoint(path)
        data = state["data"]
        if (data["world_size"], data["workers"]) != (self.dist.world_size, self.num_workers):
            raise ConfigError(f"{path} was written by {data['world_size']} ranks x {data['workers']} data workers; "
                              f"resume with the same (this run: {self.dist.world_size} x {self.num_workers})")
        try:
            self.module.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0]
            raise ckpt.CheckpointError(f"{path}: does not fit this run's model ({first})") from error
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.dist.device)
        self.start_step = state["step"]
        return [Position(*p) for p in data["positions"][self.dist.rank]]

    # ------------------------------------------------------------------ the loop

    def _set_schedules(self, step: int) -> dict[str, float]:
        c = self.config
        lr = warmup_cosine(step, self.total_steps, c.peak_lr, c.min_lr, self.warmup_steps)
        wd = c.weight_decay if c.weight_decay_end is None else warmup_cosine(step, self.total_steps, c.weight_decay, c.weight_decay_end)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["weight_decay"] > 0:
                group["weight_decay"] = wd
        return {"lr": lr, "wd": wd}

    def train_step(self, batch: dict[str, Any] | list[dict[str, Any]], step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch as the data stream yields it (uint8 pixels, raw targets), or on the
        micro-batches of one step (gradient accumulation: their gradients are averaged before the update,
        and under DDP only the last backward all-reduces). Returns the losses, averaged over them."""
        c = self.config
        micro_batches = batch if isinstance(batch, list) else [batch]
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for k, part in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.model is self.module else self.model.no_sync():
                losses = self._forward(part, step)
                (losses["loss"] / len(micro_batches)).backward()
            for name, value in losses.items():
                value = value.detach() / len(micro_batches)
                totals[name] = value if name not in totals else totals[name] + value
        self.method.before_optimizer_step(step)
        if c.clip_grad > 0 and c.clip_mode == "per_parameter":
            clip_per_parameter(self.module.parameters(), c.clip_grad)
        elif c.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), c.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.ema_source, self.method.ema_momentum(step))
        self.method.after_step(step)
        return totals

    def _forward(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """The method's losses on one (micro-)batch; a loss that is not finite on any rank stops the run."""
        device = self.dist.device
        batch = prepare_batch(batch, device, self.student.preprocessing.mean, self.student.preprocessing.std)
        if self.teachers.targets is not None:
            batch["targets"] = self.teachers.targets(batch)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = self.model(batch, step, None if self.ema is None else self.ema.module)
        if any_rank(~torch.isfinite(losses["loss"].detach())):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            saved = ckpt.list_checkpoints(self.run_dir)
            raise TrainingError(f"step {step + 1}: the loss is not finite ({terms}); training stopped. "
                                f"Last good checkpoint: {saved[-1] if saved else 'none'}")
        return losses

    def fit(self) -> dict[str, Any]:
        c = self.config
        metrics_path = self.run_dir / METRICS_FILE
        if self.start_step >= self.end_step:  # a finished run resumed: nothing to train, and nothing to rewrite
            return self._finished(metrics_path)
        tensorboard = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, self.start_step)
            tensorboard = TensorBoardLog(self.run_dir, self.start_step) if c.tensorboard else None
        try:
            return self._fit(metrics_path, tensorboard)
        finally:
            if tensorboard is not None:
                tensorboard.close()

    def _fit(self, metrics_path: Path, tensorboard: TensorBoardLog | None) -> dict[str, Any]:
        c = self.config
        data = iter(self.loader)
        last_saved, last_log = self.start_step, None
        tick, images = time.perf_counter(), 0
        self.model.train()
        with progress_bar("loss", "speed") as progress:
            task = progress.add_task(f"{c.method} on {Path(c.data).name}", total=self.end_step,
                                     completed=self.start_step, loss="", speed="")
            for step in range(self.start_step, self.end_step):
                micro_batches = [next(data) for _ in range(c.grad_accum_steps)]
                for k, batch in enumerate(micro_batches):
                    expected = (step * c.grad_accum_steps + k) % self.num_workers
                    if batch["_stream"] != expected:
                        raise TrainingError(f"step {step + 1}: batch from data stream {batch['_stream']}, "
                                            f"expected {expected}")
                    self.positions[batch["_stream"]] = Position(*batch["_position"])
                schedule = self._set_schedules(step)
                losses = self.train_step(micro_batches, step)
                images += c.batch_size
                done = step + 1
                if done % c.log_every == 0 or done == self.end_step:
                    elapsed = time.perf_counter() - tick
                    record = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), **schedule,
                              **{k: float(v.detach()) for k, v in losses.items()}, "images_per_s": round(images / max(elapsed, 1e-9), 1)}
                    if self.dist.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if tensorboard is not None:
                            tensorboard.add(record)
                    progress.update(task, loss=f"loss {record['loss']:.4f}", speed=f"{record['images_per_s']:.0f} img/s")
                    last_log, tick, images = record, time.perf_counter(), 0
                progress.update(task, completed=done)
                if c.checkpoint_every and done % c.checkpoint_every == 0:
                    self._save(done)
                    last_saved = done
        path = ckpt.checkpoint_path(self.run_dir, self.end_step)
        if last_saved != self.end_step or not path.exists():
            path = self._save(self.end_step) or path
        if self.dist.is_main:
            plot_run(self.run_dir)
        return {"run": str(self.run_dir), "steps": self.end_step, "checkpoint": str(path),
                "loss": None if last_log is None else last_log["loss"]}


    def _finished(self, metrics_path: Path) -> dict[str, Any]:
        if self.dist.is_main:
            console.print(f"{self.run_dir} is already at step {self.start_step} of {self.end_step}: nothing to train "
                          f"(a larger --max-steps, up to the {self.total_steps} steps of its epochs, continues it)")
        records = read_metrics(self.run_dir) if metrics_path.exists() else []
        return {"run": str(self.run_dir), "steps": self.start_step,
                "checkpoint": str(ckpt.checkpoint_path(self.run_dir, self.start_step)),
                "loss": records[-1]["loss"] if records else None}


def clip_per_parameter(parameters, max_norm: float) -> None:
    """DINO's utils.clip_gradients: scale each gradient whose norm exceeds `max_norm` down to it, each on its
    own. DINO branches on `clip_coef < 1` per tensor (a host sync each); clamping the coefficient at 1 gives
    the same numbers and keeps the step free of syncs."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(torch.clamp(max_norm / (p.grad.norm(2) + 1e-6), max=1.0))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines after `step`: a resumed run writes them again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def train(cli_values: dict[str, Any], config_file: str | Path | None = None, resume: bool = False,
          device: str | None = None, overrides: tuple[str, ...] = (), origin: str | None = None) -> dict[str, Any]:
    """`distillery train`: resolve the config (file, CLI, then `--set`), set up DDP if launched by torchrun, and fit.
    `origin`, a line saying which recipe the config came from, is printed once the config is known to be good."""
    if resume and overrides:
        raise ConfigError("--resume continues a run with its saved config; --set would change it")
    if resume:
        out = cli_values.get("out") or (read_yaml(config_file).get("out") if config_file else None)
        if not out:
            raise ConfigError("--resume needs --out RUN")
        saved = load_saved(Path(out) / CONFIG_FILE)
        given = {k: v for k, v in cli_values.items() if v is not None}
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE_CHANGES and getattr(saved, k) != v)
        if changed:
            raise ConfigError(f"--resume continues {out} with its saved config; these options differ: {', '.join(changed)} "
                              f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
        config = dataclasses.replace(saved, **{k: v for k, v in given.items() if k in RESUMABLE_CHANGES})
    else:
        config = resolve(read_yaml(config_file) if config_file else {}, cli_values, str(config_file or "command line"),
                         overrides)
        if ckpt.list_checkpoints(config.out):
            raise ConfigError(f"{config.out} already holds a run; use --resume to continue it, or another --out")
        if origin and is_main_process():
            console.print(origin)
    dist = init_distributed(device)
    if dist.is_main:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        save(config, Path(config.out) / CONFIG_FILE)
    trainer = Trainer(config, dist, resume=resume)
    if dist.is_main and resume:
        console.print(f"resuming {config.out} at step {trainer.start_step}")
    return trainer.fit()
