"""onnxruntime inference: no torch, no click."""
