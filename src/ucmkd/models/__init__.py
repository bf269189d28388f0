"""Backbones, classifiers and projectors."""
from . import adapters  # noqa: F401  (registers optional backbones; imports nothing optional)
from .backbones import (AUTO_BACKBONE, BACKBONES, Classifier, Encoder, build_classifier, build_model,
                        make_projector)

__all__ = ["AUTO_BACKBONE", "BACKBONES", "Classifier", "Encoder", "build_classifier", "build_model", "make_projector"]
