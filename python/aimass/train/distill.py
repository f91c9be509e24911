"""Knowledge distillation (Hinton et al. 2015)."""
from __future__ import annotations


def distill_loss(student_logits, teacher_logits, target, temperature: float = 4.0, alpha: float = 0.5,
                 task_loss=None):
    """alpha * KL(softmax(teacher/T) || softmax(student/T)) * T^2 + (1 - alpha) * task_loss(student, target).

    The KL term is averaged over the batch (``batchmean``); T^2 keeps its gradients on the
    scale of the task loss as T changes. task_loss defaults to cross-entropy."""
    import torch.nn.functional as F
    if temperature <= 0:
        raise ValueError(f"distill_loss: temperature must be > 0, got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"distill_loss: alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                  reduction="batchmean", log_target=True) * (t * t)
    task = (task_loss or F.cross_entropy)(student_logits, target)
    return alpha * kl + (1 - alpha) * task
