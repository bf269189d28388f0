"""Training loop, strategies (standard, bilevel), checkpoints and teacher caching."""
from .checkpoint import apply_threads, load_checkpoint, save_checkpoint, seed_everything
from .strategies import STRATEGIES, BilevelStrategy, StandardStrategy, Strategy
from .teacher import get_teacher, load_teacher, teacher_dir
from .trainer import FitResult, Trainer, evaluate, warmup_cosine

__all__ = ["apply_threads", "load_checkpoint", "save_checkpoint", "seed_everything", "STRATEGIES", "BilevelStrategy",
           "StandardStrategy", "Strategy", "get_teacher", "load_teacher", "teacher_dir", "FitResult",
           "Trainer", "evaluate", "warmup_cosine"]
