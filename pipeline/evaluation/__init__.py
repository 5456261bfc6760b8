"""Accuracy assessment against reference annotations (torch-free)."""

from pipeline.evaluation.crowns import crown_metrics, match_crowns, metrics_markdown, pixel_iou, write_metrics

__all__ = ["crown_metrics", "match_crowns", "metrics_markdown", "pixel_iou", "write_metrics"]
