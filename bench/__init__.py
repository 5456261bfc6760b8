"""Benchmarks (latency of ONNX models on CPU)."""
