"""What UNIC's heads cost beside the student, at the paper geometry (ViT-S/16 student at 224 px).

    python benchmarks/unic_heads.py --batch-size 4 --rounds 3

Forward FLOPs per image (torch.utils.flop_counter) of the student and of UNIC's heads, for the ladder of
projectors (UNIC's default: one MLP per student block, hidden 768, 3072 on the last) and for a single MLP
head, with two teachers (ViT-S/16: 384-d, ViT-B/16: 768-d, 14 x 14 patches); then the seconds of a training
step's forward and backward, student alone against UNIC's whole loss on cached-style targets, the two run
in turn `--rounds` times (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import distillery  # noqa: F401  (registers the torchvision op schemas timm needs)
import torch
from torch.utils.flop_counter import FlopCounterMode

from distillery.models.students import initial_student
from distillery.models.teachers import Tokens
from distillery.train.methods import MethodContext, TeacherInfo, create_method

TEACHERS = (TeacherInfo("vit_small_patch16_224", 384, (14, 14)), TeacherInfo("vit_base_patch16_224", 768, (14, 14)))
HEADS = {"ladder": {"head": "ladder", "ladder_hidden_dim": 768, "ladder_last_hidden_dim": 3072},
         "mlp": {"head": "mlp", "mlp_hidden_dim": 2048}}


def unic(student, head: str):
    context = MethodContext(student_dim=student.embed_dim, student_grid=student.grid, student_size=(224, 224),
                            student_depth=student.depth, teachers=TEACHERS, label_classes={}, total_steps=1,
                            steps_per_epoch=1, seed=0)
    return create_method("unic", HEADS[head], context)


def batch_of(size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    targets = {t.name: Tokens(torch.randn(size, t.dim, generator=generator), torch.randn(size, 196, t.dim, generator=generator))
               for t in TEACHERS}
    return {"student": torch.randn(size, 3, 224, 224, generator=generator), "targets": targets}


def flops(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def step_seconds(fn) -> float:
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    student = initial_student("vit_small_patch16_224", {}, 0)
    one = batch_of(1)
    student_flops = flops(lambda: student(one["student"]))
    result = {"student_gflop_per_image": round(student_flops / 1e9, 2),
              "student_params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1)}
    for head in HEADS:
        method = unic(student, head)
        result[f"{head}_heads_params_m"] = round(sum(p.numel() for p in method.heads.parameters()) / 1e6, 1)
        result[f"{head}_heads_gflop_per_image"] = round(
            (flops(lambda: method(student, one, 0, None)) - student_flops) / 1e9, 2)
    batch, method = batch_of(args.batch_size), unic(student, "ladder")
    times = {"student_alone_s": [], "unic_ladder_s": []}
    for _ in range(args.rounds):
        times["student_alone_s"].append(step_seconds(lambda: student(batch["student"]).cls.float().pow(2).mean()))
        times["unic_ladder_s"].append(step_seconds(lambda: method(student, batch, 0, None)["loss"]))
    result.update({name: round(statistics.median(values), 2) for name, values in times.items()})
    result["ladder_step_share_of_heads_and_loss"] = round(1 - result["student_alone_s"] / result["unic_ladder_s"], 2)
    result["batch_size"], result["threads"] = args.batch_size, torch.get_num_threads()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
