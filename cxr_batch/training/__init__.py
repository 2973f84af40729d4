"""Training and export: the only package that imports torch or writes ONNX. Needs the train extra."""
