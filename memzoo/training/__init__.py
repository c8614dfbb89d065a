"""Training: the truncated-BPTT trainer (data parallel with torch.distributed) and CMA-ES evolution."""

from .param_groups import param_groups as param_groups
from .trainer import BatchFn, TrainConfig, Trainer, weighted_loss

__all__ = ["BatchFn", "Trainer", "TrainConfig", "weighted_loss"]
