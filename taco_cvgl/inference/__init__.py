"""Running the embedder fast: backends beside the eager model, ONNX export, GPU decoding."""
