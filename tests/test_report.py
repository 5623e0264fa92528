"""report.html: every section, self-contained, capped galleries; opened in headless Chromium."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from imgclf import cli, evaluation
from imgclf.deploy.bundle import save_bundle
from imgclf.config import TrainConfig
from imgclf.data.transforms import Preprocess
from imgclf.data.summary import DataSummary
from imgclf.data.validate import CheckReport, DuplicateSet, FileIssue
from imgclf.io import atomic_write_json, atomic_write_text
from imgclf.report import html as report_html
from imgclf.report import html_extras
from imgclf.commands.run import Run
from imgclf.rundir import write_rows_csv

SINGLE_SECTIONS = ["overview", "data", "training", "lr-finder", "confusion", "per-class",
                   "most-confused", "top-losses", "confident-wrong", "curves", "calibration",
                   "heatmaps"]
PLOTS = ["class_counts", "curves", "lr_find", "confusion", "confusion_normalized", "pr_curves",
         "roc_curves", "calibration"]


def make_fake_run(root: Path, n: int = 40, multi_label: bool = False, extras: bool = True,
                  seed: int = 0) -> Path:
    """A complete run directory without training: generated images, seeded probabilities, a
    random-init tiny bundle and every side file the report reads."""
    import timm

    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = ["cat", "dog", "bird"]
    paths = []
    for i in range(n):
        path = root / "data" / classes[i % 3] / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    data = root / "data"
    run = root / "run"
    TrainConfig(data=str(data), model="test_efficientnet", pretrained=False, size=32,
                multi_label=multi_label).to_yaml(run / "config.yaml")
    if multi_label:
        targets = (rng.random((n, 3)) < 0.4).astype(np.int8)
        probs = np.clip(targets * 0.7 + rng.random((n, 3)) * 0.5, 0.01, 0.99)
        search = evaluation.search_thresholds(probs, targets, classes=classes)
        atomic_write_json(run / "thresholds.json", search.to_dict())
        thresholds = search.thresholds
    else:
        targets = np.arange(n) % 3
        logits = rng.normal(0, 1, (n, 3)) + 2.0 * np.eye(3)[targets]
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        thresholds = None
    preds = evaluation.Predictions(paths=[str(p) for p in paths], classes=classes, probs=probs,
                                   targets=targets, multi_label=multi_label, thresholds=thresholds)
    preds.to_csv(run / "predictions.csv")
    scores = evaluation.metrics(preds)
    monitor = "valid_zero_one_accuracy" if multi_label else "valid_accuracy"
    rows = [{"epoch": e, "stage": "frozen" if e == 0 else "unfrozen", "lr": 1e-3,
             "train_loss": 1.0 / (e + 1), "valid_loss": 1.1 / (e + 1), monitor: 0.5 + 0.1 * e,
             "seconds": 1.0 + e} for e in range(3)]
    if extras:
        rows += [{"epoch": 3 + r, "stage": f"mining round {r}", "round": r, "lr": 1e-4,
                  "train_loss": 0.3, "valid_loss": 0.4, monitor: 0.8, "seconds": 5.0}
                 for r in range(2)]
    write_rows_csv(run / "metrics.csv", rows)
    atomic_write_json(run / "metrics.json", {
        **{f"valid_{k}": v for k, v in scores.items() if not isinstance(v, (dict, list))},
        "model": "test_efficientnet", "task": "multi_label" if multi_label else "single_label",
        "epochs": len(rows), "best_epoch": 2, "best_stage": "unfrozen", "lr": 1e-3,
        "train_seconds": 3.0, "train_images": 100, "valid_images": n})
    lrs = np.logspace(-6, 0, 50)
    atomic_write_json(run / "lr_find.json", {"lrs": lrs.tolist(),
                                             "losses": (1.2 - 0.1 * np.log10(lrs)).tolist(),
                                             "suggestion": 1e-3, "rule": "valley"})
    dup = DuplicateSet("abc", ["cat/000.jpg", "dog/001.jpg"], ["train", "valid"], [["cat"], ["dog"]])
    checks = CheckReport(checked=n + 1, unusable=[FileIssue("bad.jpg", "truncated JPEG")],
                         leakage=[dup], label_conflicts=[dup])
    summary = DataSummary(classes=classes, multi_label=multi_label,
                          images={"train": 100, "valid": n},
                          counts={"train": {c: 33 + (c == "cat") for c in classes},
                                  "valid": {c: int((targets == j).sum()) if not multi_label
                                            else int(targets[:, j].sum())
                                            for j, c in enumerate(classes)}},
                          imbalance_ratio=1.03, imbalanced=False, notes=checks.lines())
    atomic_write_json(run / "data_summary.json", {"summary": summary.to_dict(),
                                                   "checks": checks.to_dict()})
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    save_bundle(run / "model", model, "test_efficientnet", classes, multi_label,
                Preprocess(size=32, presize=36),
                thresholds=None if thresholds is None else [float(t) for t in thresholds])
    if extras:
        atomic_write_json(run / "mining" / "rounds.json", {
            "best_round": 1, "stop_reason": "rounds done", "baseline": {"fp_rate_V": 0.9},
            "rounds": [{"round": r, "fp_rate_V": 0.5 - 0.2 * r, "n_mined": 2,
                        "mined": [{"path": str(paths[2 * r + k]), "predicted": "cat",
                                   "confidence": 0.9} for k in range(2)],
                        "confusion": [[1, 0], [0, 1]]} for r in range(2)]})
        lines = ["rank,path,given,suggested,score,given_prob,suggested_prob"]
        lines += [f"{k + 1},{paths[k]},cat,dog,{0.5 - 0.1 * k},0.2,0.7" for k in range(3)]
        atomic_write_text(run / "label_issues.csv", "\n".join(lines) + "\n")
    return run


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    # More validation images than the top-loss gallery shows, to see the cap at work.
    run = make_fake_run(tmp_path_factory.mktemp("single"), n=report_html.TOP_LOSSES + 20)
    report_html.write_report(run)
    return run


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> Path:
    run = make_fake_run(tmp_path_factory.mktemp("multi"), multi_label=True, extras=False)
    report_html.write_report(run)
    return run


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


def test_report_has_every_section_and_plot(single_run):
    page = (single_run / "report.html").read_text(encoding="utf-8")
    ids = _section_ids(page)
    assert ids[:len(SINGLE_SECTIONS)] == SINGLE_SECTIONS
    assert "rounds" in ids and "label-issues" in ids  # the side files of mining and label issues
    assert 'class="error"' not in page
    for name in PLOTS:
        assert (single_run / "plots" / f"{name}.png").stat().st_size > 1000, name
    # The table of contents links every section.
    assert re.findall(r'<a href="#([^"]+)"', page) == ids


def test_report_is_self_contained(single_run):
    page = (single_run / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources
    assert all(s.startswith(("data:image/", "#")) for s in sources), \
        [s[:40] for s in sources if not s.startswith(("data:image/", "#"))]
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_report_shows_data_findings_stages_and_rounds(single_run):
    page = (single_run / "report.html").read_text(encoding="utf-8")
    assert "LEAKAGE" in page and "truncated JPEG" in page
    assert "frozen: epoch 0" in page and "mining round 1" in page
    assert "rounds done" in page and "confidence: 0.900" in page  # rounds.json table and picks
    assert "suggested: dog" in page  # label_issues.csv gallery
    assert "Grad-CAM" in page and "what the model saw" in page


def test_galleries_are_capped(single_run):
    page = (single_run / "report.html").read_text(encoding="utf-8")
    top = page.split('id="top-losses"')[1].split("</section>")[0]
    assert top.count('<figure class="card') == report_html.TOP_LOSSES
    wrong = page.split('id="confident-wrong"')[1].split("</section>")[0]
    groups = wrong.split('<div class="group">')[1:]
    assert groups and all(g.count('<figure class="card') <= report_html.WRONG_PER_CLASS for g in groups)
    heat = page.split('id="heatmaps"')[1].split("</section>")[0]
    n_items = heat.count('<div class="item')
    assert 0 < n_items <= html_extras.HEATMAPS_WRONG + html_extras.HEATMAPS_RIGHT


def test_multi_label_report(multi_run):
    page = (multi_run / "report.html").read_text(encoding="utf-8")
    ids = _section_ids(page)
    assert "thresholds" in ids and "rounds" not in ids
    assert 'class="error"' not in page
    assert "true positives" in page  # per-class 2x2 counts
    assert "threshold" in page.split('id="per-class"')[1].split("</section>")[0]
    assert (multi_run / "plots" / "thresholds.png").is_file()


@pytest.mark.slow
def test_cli_report_regenerates(single_run, tmp_path):
    run = Path(shutil.copytree(single_run, tmp_path / "copy"))
    (run / "report.html").unlink()
    (run / "plots" / "calibration.png").unlink()
    result = CliRunner().invoke(cli.app, ["report", str(run), "--no-heatmaps"])
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "calibration.png").is_file()
    assert "Heatmaps were not requested" in (run / "report.html").read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_survives_moved_images(tmp_path):
    run = make_fake_run(tmp_path, n=9, extras=False)
    shutil.rmtree(tmp_path / "data")
    page = report_html.write_report(run).read_text(encoding="utf-8")
    assert 'class="error"' not in page
    assert "image not readable" in page and "could not be read, so have no heatmap" in page


def test_report_of_unfinished_run_is_a_clear_error(tmp_path):
    from imgclf.errors import ImgclfError

    TrainConfig(data="x").to_yaml(tmp_path / "config.yaml")
    with pytest.raises(ImgclfError, match="no predictions.csv"):
        report_html.write_report(Run(tmp_path))


def test_train_writes_the_report(tiny_run):
    page = tiny_run.report_path.read_text(encoding="utf-8")
    assert set(SINGLE_SECTIONS) <= set(_section_ids(page))
    assert 'class="error"' not in page


# ---------------------------------------------------------------------------------------------
# Headless Chromium, driven over the DevTools protocol on a pipe (no extra dependency)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

PAGE_CHECK = """(() => {
  document.querySelectorAll('details').forEach(d => { d.open = true; });
  const sections = [...document.querySelectorAll('main section')];
  return JSON.stringify({
    sections: sections.map(s => ({id: s.id, height: s.getBoundingClientRect().height,
                                  title: s.querySelector('h2') ? s.querySelector('h2').innerText : '',
                                  error: !!s.querySelector('.error')})),
    images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
                                            w: i.naturalWidth, alt: i.alt})),
    scrollWidth: document.documentElement.scrollWidth,
  });
})()"""


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4)."""

    def __init__(self, exe: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Copies at free descriptors >= 10, so that moving them onto 3 and 4 in the child
        # cannot overwrite one with the other.
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def move_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=move_fds)
        os.close(hi_r)
        os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read(timeout)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def open_in_chromium(page: Path, profile: Path, width: int = 1366, height: int = 768) -> tuple[dict, list[str]]:
    """Load a file in headless Chromium at a laptop's window size.

    Returns:
        The PAGE_CHECK result, and every console error, uncaught exception or error log entry.
    """
    dt = DevTools(CHROMIUM, profile)
    try:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            dt.send(f"{domain}.enable", session=session)
        dt.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                       "deviceScaleFactor": 1, "mobile": False},
                session=session)
        dt.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        dt.wait_for("Page.loadEventFired", timeout=120)
        result = dt.send("Runtime.evaluate", {"expression": PAGE_CHECK, "returnByValue": True},
                         session=session)
        errors = []
        for e in dt.events:
            params = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(str(params.get("args")))
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append(str(params.get("exceptionDetails")))
            elif e.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return json.loads(result["result"]["value"]), errors
    finally:
        dt.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("which", ["single_run", "multi_run"])
def test_report_loads_in_chromium(which, request, tmp_path):
    run = request.getfixturevalue(which)
    check, errors = open_in_chromium(run / "report.html", tmp_path / "profile")
    assert errors == []
    page = (run / "report.html").read_text(encoding="utf-8")
    assert [s["id"] for s in check["sections"]] == _section_ids(page)
    for s in check["sections"]:
        assert s["height"] > 60 and s["title"] and not s["error"], s
    n_img = len(re.findall(r"<img ", page))
    assert n_img > 20 and len(check["images"]) == n_img
    broken = [i for i in check["images"] if not i["ok"]]
    assert broken == []
    assert check["scrollWidth"] <= 1366  # no sideways scrolling on a laptop screen


def test_class_names_the_font_lacks_give_one_log_line_not_a_warning_per_glyph(tmp_path, caplog):
    import logging
    import warnings

    from imgclf.report import plots

    fig, ax = plots.subplots(figsize=(3, 2))
    ax.set_title("猫 犬 鳥")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        plots.save(fig, tmp_path / "names.png")
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert "the plot font lacks 3 characters" in caplog.text
    assert (tmp_path / "names.png").stat().st_size > 0
