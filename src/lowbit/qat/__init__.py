"""LLM-QAT: data-free generation, distillation losses and the training loop."""

from .datagen import DatagenConfig, dataset_stats, generate_dataset, load_dataset
from .train import TrainConfig, freeze_student, train

__all__ = ["DatagenConfig", "TrainConfig", "dataset_stats", "freeze_student", "generate_dataset", "load_dataset", "train"]
