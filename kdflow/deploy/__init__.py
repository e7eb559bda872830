"""Stage 6, deployment: the model as a checked ONNX file, its int8 version, and their latency on the CPU."""
