"""Training: the truncated-BPTT trainer (data parallel with torch.distributed) and CMA-ES evolution."""

from .evolution import Evolution, EvolutionConfig, evolve_namm, namm_fitness
from .param_groups import param_groups as param_groups
from .trainer import BatchFn, TrainConfig, Trainer, weighted_loss
from .warm_start import warm_start

__all__ = [
    "BatchFn",
    "Evolution",
    "EvolutionConfig",
    "Trainer",
    "TrainConfig",
    "evolve_namm",
    "namm_fitness",
    "warm_start",
    "weighted_loss",
]
