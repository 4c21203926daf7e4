"""lemon-onnx: lossless width and depth expansion (LEMON) of Transformers exported to ONNX."""

__version__ = "0.1.0"
