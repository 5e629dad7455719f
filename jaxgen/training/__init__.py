"""Training: one compiled trainer, optimizers, checkpoints and metric writers."""

from jaxgen.training.checkpoint import Checkpointer, train_with_checkpoints
from jaxgen.training.consistency import ConsistencyTrainer
from jaxgen.training.metric_writers import MetricWriter, read_jsonl
from jaxgen.training.optim import adam_with_schedule
from jaxgen.training.trainer import TrainState, Trainer, ema_update

__all__ = ["Trainer", "TrainState", "ema_update", "adam_with_schedule", "Checkpointer", "train_with_checkpoints",
           "ConsistencyTrainer", "MetricWriter", "read_jsonl"]
