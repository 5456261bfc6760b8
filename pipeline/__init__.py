"""Inference-time core: orthomosaic in, tree crowns, attributes, carbon and GIS layers out (no torch)."""

__version__ = "0.1.0"
