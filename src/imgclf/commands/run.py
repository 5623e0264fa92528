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
