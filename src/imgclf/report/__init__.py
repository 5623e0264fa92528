"""The report: a run directory in, report.html and plots/*.png out.

    interpret.py   Interpretation: error analysis of predictions from Python (data, or figures)
    html.py        report.html (html_parts.py: its cells, captions and data URIs)
    plots.py       every figure (matplotlib, Agg backend)
    gradcam.py     Grad-CAM heatmaps

Reads the run directory through `imgclf.rundir`, `imgclf.evaluation` and `imgclf.deploy`;
never through the commands above it.
"""
