"""Tasks: data + model + loss + metric + the local training step, shared by agent, pretraining and bench."""

from fedge.tasks.classification import ClassificationTask, LocalTrainer, TrainResult, default_device, preprocess

__all__ = ["ClassificationTask", "LocalTrainer", "TrainResult", "default_device", "preprocess"]
