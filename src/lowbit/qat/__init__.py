"""LLM-QAT: data-free generation, distillation losses and the training loop."""

from .datagen import DatagenConfig, dataset_stats, generate_dataset, load_dataset
from .train import TrainConfig, freeze_student, init_distributed, train

__all__ = ["DatagenConfig", "TrainConfig", "dataset_stats", "freeze_student", "generate_dataset", "init_distributed", "load_dataset", "train"]
