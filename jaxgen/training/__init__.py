"""Training: one compiled trainer and one loop for every objective, callbacks, checkpoints, optimizers and metric
writers."""

from jaxgen.training.callbacks import Callback, Checkpointing, Every, MetricLogger
from jaxgen.training.checkpoint import CheckpointWriteError, Checkpointer, CorruptCheckpointError
from jaxgen.training.metric_writers import MetricWriter, read_jsonl
from jaxgen.training.optim import adam_with_schedule
from jaxgen.training.parallel import data_mesh, global_batch, initialize, is_main_process
from jaxgen.training.trainer import TrainState, Trainer, Update, ema_update

__all__ = ["Trainer", "TrainState", "Update", "ema_update", "adam_with_schedule", "Checkpointer", "Callback",
           "Checkpointing", "Every", "MetricLogger", "MetricWriter", "read_jsonl", "CorruptCheckpointError",
           "CheckpointWriteError", "data_mesh", "global_batch", "initialize", "is_main_process"]
