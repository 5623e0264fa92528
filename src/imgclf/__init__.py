"""imgclf: train, evaluate, explain and deploy image classifiers from labelled photos.

    import imgclf
    run = imgclf.train("photos/", epochs=5)          # a Run (runs/<name>/)
    model = imgclf.load(run.path)                     # the bundle
    result = model.predict(["a.jpg"])                 # probabilities and labels
"""

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "predict", "load", "mine", "cross_validate", "show_batch", "Run",
           "Interpretation", "__version__"]

# Imported lazily so that torch-free modules (imgclf.deploy.onnx_predict, imgclf.data.images)
# can be used where torch is not installed. No submodule of this package is named like one of
# these, so `imgclf.predict` is always the function.
_LAZY = {"train": "imgclf.api", "evaluate": "imgclf.api", "predict": "imgclf.api",
         "load": "imgclf.api", "mine": "imgclf.api", "cross_validate": "imgclf.api",
         "show_batch": "imgclf.api",
         "Run": "imgclf.api", "Interpretation": "imgclf.report.interpret"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
