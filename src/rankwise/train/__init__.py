"""The one training loop for every method, and the metrics it reports."""

from .evaluate import accuracy, exact_match, perplexity, record_perplexity
from .loop import TrainConfig, TrainingInterrupted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "accuracy", "exact_match", "perplexity",
           "record_perplexity", "train"]
