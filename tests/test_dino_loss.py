import math

import torch

from distillery.train.methods.dino import dino_loss, updated_center


def test_dino_loss_matches_a_hand_computation_without_same_view_pairs():
    # 3 student crops (2 global + 1 local), 2 teacher globals, batch of 2, 3 prototypes.
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
                            [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]],
                            [[0.3, -0.2, 0.1], [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]],
                            [[1.0, 1.0, 1.0], [0.2, -0.4, 0.6]]])
    center = torch.tensor([0.1, -0.1, 0.0])
    ts, tt = 0.5, 0.25

    def softmax(values, temperature):
        e = [math.exp(v / temperature) for v in values]
        return [x / sum(e) for x in e]

    pair_losses = []
    for i in range(2):  # teacher global crop
        for v in range(3):  # student crop
            if v == i:
                continue  # the same view is never its own target
            per_image = []
            for b in range(2):
                q = softmax([t - c for t, c in zip(teacher[i, b].tolist(), center.tolist())], tt)
                p = softmax(student[v, b].tolist(), ts)
                per_image.append(-sum(qk * math.log(pk) for qk, pk in zip(q, p)))
            pair_losses.append(sum(per_image) / 2)
    expected = sum(pair_losses) / len(pair_losses)
    assert len(pair_losses) == 4
    assert math.isclose(dino_loss(student, teacher, center, ts, tt).item(), expected, rel_tol=1e-6)


def test_dino_loss_gradient_reaches_the_student_only():
    student = torch.randn(4, 3, 8, requires_grad=True)
    teacher = torch.randn(2, 3, 8, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(8), 0.1, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


def test_center_update_uses_momentum_and_the_batch_mean():
    center = torch.tensor([1.0, 0.0])
    teacher = torch.tensor([[[0.0, 2.0], [2.0, 4.0]], [[4.0, 6.0], [6.0, 0.0]]])  # mean [3.0, 3.0]
    updated = updated_center(center, teacher.mean(dim=(0, 1)), momentum=0.9)
    assert torch.allclose(updated, torch.tensor([0.9 * 1.0 + 0.1 * 3.0, 0.1 * 3.0]))
