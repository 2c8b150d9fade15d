"""Training: one accelerate loop for every method, optimizer and callback registries, data formats, built-in
tasks, evaluation."""

from lorakit.train.data import Record, encode_rows, read_jsonl
from lorakit.train.evaluate import ExactMatch, exact_match, mean_loss
from lorakit.train.loop import TrainConfig, TrainResult, train
from lorakit.train.tasks import TASKS, Example, task_examples

__all__ = [
    "TASKS",
    "Example",
    "ExactMatch",
    "Record",
    "TrainConfig",
    "TrainResult",
    "encode_rows",
    "exact_match",
    "mean_loss",
    "read_jsonl",
    "task_examples",
    "train",
]
