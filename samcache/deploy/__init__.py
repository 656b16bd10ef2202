"""What leaves samcache: exports other tools load (state dicts, ONNX) and predictions on new images."""
