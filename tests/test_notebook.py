"""Notebooks: `imgclf.show_batch`, `Run.show_results`, the HTML Jupyter shows for a Run, an
Interpretation and a PredictionResult, and a small notebook executed end to end with nbclient
on a kernel running this interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import imgclf
from imgclf.deploy.results import PredictionResult
from imgclf.errors import ImgclfError

from conftest import TINY, make_color_dataset

SMALL = {"model": "test_efficientnet", "size": 32}


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    return make_color_dataset(tmp_path_factory.mktemp("nb") / "data", per_class=6, size=40)


def _pixels(fig: Figure) -> list[np.ndarray]:
    return [np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes if ax.get_images()]


def test_show_batch_is_what_training_sees(colors):
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    rng_state = torch.get_rng_state()
    fig = imgclf.show_batch(colors, 6, **SMALL)
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's draws are untouched
    images = _pixels(fig)
    assert len(images) == 6 and all(im.shape == (32, 32, 3) for im in images)  # model's size
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert set(titles) <= {"red", "green", "blue"}
    # Each title names the colour its image shows (the labels travel with their images).
    for im, title in zip(images, titles):
        assert "rgb".index(title[0] if title != "green" else "g") == int(
            np.argmax(im.reshape(-1, 3).mean(0)))
    again = _pixels(imgclf.show_batch(colors, 6, **SMALL))
    assert all(np.array_equal(a, b) for a, b in zip(images, again))  # seeded
    other = _pixels(imgclf.show_batch(colors, 6, seed=1, **SMALL))
    assert any(not np.array_equal(a, b) for a, b in zip(images, other))


def test_show_batch_valid_split_and_bad_options(colors):
    fig = imgclf.show_batch(colors, 3, split="valid", **SMALL)
    assert len(_pixels(fig)) == 3
    with pytest.raises(ImgclfError, match="did you mean 'epochs'"):
        imgclf.show_batch(colors, epoch=3)
    with pytest.raises(ImgclfError, match="not a timm architecture"):
        imgclf.show_batch(colors, model="no_such_net")


def test_prediction_result_html_is_compact_and_escaped():
    probs = np.array([[0.7, 0.3]] * 25, dtype=np.float32)
    res = PredictionResult(paths=[Path(f"/x/<img{i}>.jpg") for i in range(25)], probs=probs,
                           classes=["<cat>", "dog"], multi_label=False,
                           errors={Path("/x/bad.jpg"): "not an image"})
    html = res._repr_html_()
    assert "25 images, 2 classes, 1 unreadable" in html
    assert "&lt;cat&gt; 0.700" in html and "<cat>" not in html and "&lt;img0&gt;.jpg" in html
    assert html.count("<tr>") == 1 + 20 + 1  # header, 20 rows, "... 5 more"
    assert "5 more" in html


def test_interpretation_and_run_html(tmp_path):
    from imgclf.evaluation import Predictions
    from imgclf.report.interpret import Interpretation
    from test_runs import _rows, fake_run

    p = Predictions(paths=["a.jpg", "b.jpg", "c.jpg"], classes=["cat", "dog"],
                    probs=np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
                    targets=np.array([0, 1, 1]), multi_label=False)
    html = Interpretation.from_predictions(p)._repr_html_()
    assert "<b>Interpretation</b>" in html and ">3<" in html and "dog → cat (1)" in html
    assert "0.6667" in html  # accuracy

    done = fake_run(tmp_path / "done", rows=_rows([0.5, 0.8]),
                    metrics={"valid_accuracy": 0.8, "model": "resnet18", "epochs": 2,
                             "best_epoch": 1, "best_stage": "unfrozen", "train_seconds": 12.5})
    (done / "report.html").write_text("<html></html>")
    html = imgclf.Run(done)._repr_html_()
    assert "resnet18" in html and "0.8000" in html and "12.5 s" in html
    assert (done / "report.html").as_uri() in html
    assert "unfinished" in imgclf.Run(fake_run(tmp_path / "started"))._repr_html_()


@pytest.mark.slow
def test_show_results_marks_the_mistakes(tiny_run):
    fig = tiny_run.show_results(4, wrong_first=True)
    preds = tiny_run.predictions()
    wrong = int((preds.predicted != preds.targets).sum())
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 4 and all("given: " in ax.get_title() for ax in titled)
    red = [matplotlib.colors.to_hex(ax.title.get_color()) != "#000000" for ax in titled]
    assert red == [True] * min(wrong, 4) + [False] * (4 - min(wrong, 4))


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter (the venv's), found through JUPYTER_PATH."""
    spec = tmp_path / "jupyter" / "kernels" / "imgclf-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "imgclf tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    # Jupyter's own default (the inline backend, which displays figures); imgclf keeps it.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return "imgclf-test"


@pytest.mark.slow
def test_a_notebook_runs_end_to_end(colors, tmp_path, kernel):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    options = {**TINY, "epochs": 1, "out": str(tmp_path / "runs"), "name": "nb"}
    cells = [
        "import matplotlib, matplotlib.pyplot as plt\nimport imgclf\n"
        "backend = matplotlib.get_backend()",
        f"imgclf.show_batch({str(colors)!r}, 4, model='test_efficientnet', size=32)",
        f"run = imgclf.train({str(colors)!r}, **{options!r})\nrun",
        "run.show_results(4)",
        "interp = imgclf.Interpretation.from_run(run.path)\ninterp",
        f"run.load().predict([{str(colors / 'red' / 'red_000.jpg')!r}])",
        "assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())\n"
        "assert plt.get_fignums() == []\nprint('backend kept:', backend)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [cell.outputs for cell in nb.cells]

    def data(i: int) -> dict:
        return {k: v for o in outputs[i] if o.output_type == "execute_result"
                for k, v in o.data.items()}

    assert "image/png" in data(1)  # show_batch's figure, displayed as the cell's value
    assert "<b>Run</b>" in data(2)["text/html"]
    assert "image/png" in data(3)
    assert "<b>Interpretation</b>" in data(4)["text/html"]
    assert "<b>PredictionResult</b>: 1 images" in data(5)["text/html"]
    assert any("backend kept: module://matplotlib_inline" in o.get("text", "")
               for o in outputs[6])
    assert (tmp_path / "runs" / "nb" / "report.html").is_file()
