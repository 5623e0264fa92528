"""Deployment: the model bundle, prediction with it, export (ONNX, TorchScript), serving.

    bundle.py        weights.safetensors + model.json; `load` rebuilds the model with timm
    predict.py       prediction with exactly the preprocessing validation used (one result type)
    export.py        ONNX / TorchScript exports checked against the bundle
    onnx_predict.py  a torch-free predictor for the ONNX export (numpy, Pillow, onnxruntime)
    serve.py         the HTTP server

Kept free of imports so that `imgclf.deploy.onnx_predict` runs where torch is not installed.
Nothing here imports `imgclf.training` (its sibling).
"""
