"""Tasks: data + model + loss + metric + the local training step, shared by agent, pretraining and bench."""

from fedge.tasks.classification import ClassificationTask, TrainResult, preprocess

__all__ = ["ClassificationTask", "TrainResult", "preprocess"]
