"""Data: a folder, CSV or file-name pattern in, a checked table of samples and presized images out.

    sources.py (csv_source.py, files.py)  the data sources, read into a SampleTable; load_table
    split.py        train/valid split and cross-validation folds
    samples.py images.py presize.py cache.py validate.py summary.py transforms.py datasets.py

Kept free of imports: `imgclf.data.images` and `imgclf.data.presize` must import without torch
(the ONNX predictor uses them).
"""
