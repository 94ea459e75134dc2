"""Backends that run a bundle's graphs: ONNX Runtime now; Core ML and LiteRT follow."""
