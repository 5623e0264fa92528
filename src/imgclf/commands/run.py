"""`Run`: a run directory with everything later commands read from it.

The plain files (config, metrics, history) come from `imgclf.rundir.RunDir`; the validation
predictions (`imgclf.evaluation.Predictions`) and the bundle (`imgclf.deploy.bundle`) are added
here, above both of those layers.
"""

from __future__ import annotations

from imgclf import evaluation
from imgclf.deploy.bundle import load
from imgclf.rundir import RunDir


class Run(RunDir):
    """A finished (or interrupted) run directory."""

    def predictions(self):
        return evaluation.Predictions.from_csv(self.path / "predictions.csv")

    def load(self):
        """The run's bundle (see `imgclf.deploy.bundle.load`)."""
        return load(self.bundle_path)

    def show_results(self, n: int = 12, *, seed: int = 0, wrong_first: bool = False,
                     cols: int = 4):
        """A figure of validation images with their given and predicted labels (see
        `imgclf.report.notebook.show_results`)."""
        from imgclf.report.notebook import show_results  # lazy: matplotlib

        return show_results(self.path, n, seed=seed, wrong_first=wrong_first, cols=cols)

    def _repr_html_(self) -> str:
        from imgclf.report.notebook import run_html  # lazy: only Jupyter asks

        return run_html(self)
