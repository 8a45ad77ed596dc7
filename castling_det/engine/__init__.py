"""Training: the trainer and its optimizer."""
from .optimizer import build_optimizer
from .trainer import CastlingTrainer

__all__ = ["CastlingTrainer", "build_optimizer"]
