"""RIDE Serve inference service: a FastAPI server running the exported expert cascade with onnxruntime."""
