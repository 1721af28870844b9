"""Evaluation of interleaved generation: formats, adapters, metrics, judge, ShapesBench."""
