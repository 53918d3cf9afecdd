"""Loaders, model, trainer, pseudo-labelling, evaluation and prediction (later issues)."""
