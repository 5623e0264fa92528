"""`imgclf review`: queues, decisions, persistence and safety of the review server (FastAPI's
TestClient), and the page itself in a real Chromium driven by Playwright.

Most tests build a run directory by hand (generated images, a predictions.csv with known
mistakes, data checks with duplicates, a mining manifest), so they need no training; the ones
that use a trained tiny run (heatmaps, `train --corrections`) are slow.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_color_dataset
from imgclf import evaluation
from imgclf.commands.review import ReviewSession
from imgclf.config import TrainConfig
from imgclf.data import corrections as corr
from imgclf.data.corrections import Correction
from imgclf.data.sources import from_folder
from imgclf.errors import DataError, ImgclfError

CLASSES = ["blue", "green", "red"]
fastapi = pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from imgclf.commands.review.server import create_app  # noqa: E402


def fake_run(tmp_path: Path, per_class: int = 6) -> tuple[Path, Path, evaluation.Predictions]:
    """A finished-looking run over generated images, without a model.

    Validation predictions: every image right with 0.8, except three whose given label the
    model doubts (one by a wide margin, one narrowly, one confidently wrong of another class).
    """
    data = make_color_dataset(tmp_path / "data", per_class=per_class, size=24)
    run = tmp_path / "runs" / "fake"
    run.mkdir(parents=True)
    TrainConfig(data=str(data), name="fake").to_yaml(run / "config.yaml")
    paths = sorted(str(p) for p in data.glob("*/*.jpg"))
    given = [CLASSES.index(Path(p).parent.name) for p in paths]
    probs = np.full((len(paths), 3), 0.1)
    probs[np.arange(len(paths)), given] = 0.8
    wrong = {3: ([0.05, 0.9, 0.05], "wide"), 8: ([0.35, 0.25, 0.4], "narrow"),
             1: ([0.02, 0.03, 0.95], "confident")}
    for i, (row, _) in wrong.items():
        probs[i] = row
    preds = evaluation.Predictions(paths, CLASSES, probs, np.array(given))
    preds.to_csv(run / "predictions.csv")
    (run / "metrics.json").write_text(json.dumps({"task": "single_label"}))
    rel = [str(Path(p).relative_to(data)) for p in paths]
    checks = {"duplicates": [{"digest": "x", "files": [rel[0], rel[1]], "splits": ["valid"] * 2,
                              "labels": [["blue"], ["blue"]]}],
              "near_duplicates": [{"train": rel[3], "other": rel[4], "split": "valid",
                                   "distance": 2, "labels": [["blue"], ["blue"]]}]}
    (run / "data_summary.json").write_text(json.dumps({"summary": {}, "checks": checks}))
    pool = tmp_path / "pool"
    pool_imgs = [str(p.resolve()) for p in make_color_dataset(pool, per_class=2, size=24,
                                                              classes=("gray",)).glob("*/*.jpg")]
    (run / "mining").mkdir()
    (run / "mining" / "pool.json").write_text(json.dumps(
        {"pool": str(pool), "mining": pool_imgs, "valid": []}))
    (run / "mining" / "manifest.json").write_text(json.dumps(
        {"options": {"negative_label": "negative"}, "rounds": [
            {"round": 0, "mined": [{"path": pool_imgs[0], "predicted": "red",
                                    "confidence": 0.7}]},
            {"round": 1, "mined": [{"path": pool_imgs[1], "predicted": "blue",
                                    "confidence": 0.9}]}]}))
    return run, data, preds


@pytest.fixture
def run(tmp_path):
    return fake_run(tmp_path)


def client_for(run_dir: Path) -> TestClient:
    return TestClient(create_app(ReviewSession(run_dir)))


def test_queues(run):
    run_dir, data, preds = run
    s = ReviewSession(run_dir)
    issues = s.queue("label_issues")
    # The label-issues ranking (largest margin first) and its suggestions.
    assert [x["path"] for x in issues] == [preds.paths[i] for i in (1, 3, 8)]
    assert [x["suggested"] for x in issues] == ["red", "green", "red"]
    assert issues[0]["given"] == ["blue"] and issues[0]["predicted"] == ["red"]
    assert issues[0]["duplicates"][0]["path"] == preds.paths[0]
    assert issues[0]["probs"][0] == ["red", pytest.approx(0.95)]
    assert ["blue", pytest.approx(0.02)] in issues[0]["probs"]  # the given label's, too
    assert [x["path"] for x in s.queue("top_losses")[:3]] == [preds.paths[i] for i in (1, 3, 8)]
    wrong = s.queue("confident_wrong")
    assert [x["path"] for x in wrong] == [preds.paths[i] for i in (1, 3, 8)]
    assert [x["group"] for x in wrong] == ["blue", "blue", "green"]
    mined = s.queue("mined")
    assert [x["predicted"] for x in mined] == [["red"], ["blue"]]
    assert all(x["source"] == "pool" and x["given"] == ["negative"] for x in mined)
    # Duplicates from the data checks, both ways.
    dup = {d["path"]: d for d in s.items[preds.paths[0]]["duplicates"]}
    assert dup == {preds.paths[1]: {"path": preds.paths[1], "rel": "blue/blue_001.jpg",
                                    "kind": "identical", "distance": 0}}
    assert s.items[preds.paths[4]]["duplicates"][0]["kind"] == "near"
    assert s.items[preds.paths[3]]["duplicates"][0]["path"] == preds.paths[4]
    with pytest.raises(ImgclfError, match="no queue"):
        s.queue("nope")


def test_decisions_are_saved_at_once_and_survive_a_new_server(run):
    run_dir, data, preds = run
    c = client_for(run_dir)
    state = c.get("/api/state").json()
    assert state["classes"] == CLASSES and state["counts"]["total"] == 0
    assert [q["name"] for q in state["queues"]] == ["label_issues", "top_losses",
                                                   "confident_wrong", "mined"]
    a, b, d, e = preds.paths[1], preds.paths[3], preds.paths[8], preds.paths[5]
    assert c.post("/api/decision", json={"path": a, "action": "relabel",
                                         "labels": ["red"]}).status_code == 200
    c.post("/api/decision", json={"path": b, "action": "exclude"})
    c.post("/api/decision", json={"path": d, "action": "negative"})
    r = c.post("/api/decision", json={"path": e, "action": "keep"}).json()
    assert r["counts"] == {"keep": 1, "relabel": 1, "exclude": 1, "negative": 1, "total": 4,
                           "can_undo": True}
    rows = list(csv.DictReader(open(run_dir / "corrections.csv", encoding="utf-8")))
    assert [(x["path"], x["action"], x["labels"], x["source"]) for x in rows] == [
        (a, "relabel", "red", "data"), (b, "exclude", "", "data"),
        (d, "negative", "negative", "data"), (e, "keep", "", "data")]
    assert all(x["time"].endswith("+00:00") for x in rows)
    # A second decision about an image replaces the first; undo brings the first back.
    c.post("/api/decision", json={"path": a, "action": "relabel", "labels": ["green"]})
    assert c.post("/api/undo").json()["decision"]["labels"] == ["red"]
    # A pool image's decision is marked as such (training skips it; mining applies it).
    mined = c.get("/api/state").json()["queues"][3]["paths"][0]
    c.post("/api/decision", json={"path": mined, "action": "exclude"})
    # A new server (a restart) shows the same decisions.
    state = client_for(run_dir).get("/api/state").json()
    assert state["decisions"][a]["labels"] == ["red"]
    assert {p: x["action"] for p, x in state["decisions"].items()} == {
        a: "relabel", b: "exclude", d: "negative", e: "keep", mined: "exclude"}
    assert state["counts"]["can_undo"] is False
    # The user's data is untouched, and the file trains: only the run folder was written.
    table = from_folder(data, valid_pct=0.3, seed=0)
    out, applied = corr.apply_file(table, run_dir / "corrections.csv")
    labels = {str(x.path): x.labels for x in out.samples}
    assert labels[a] == ("red",) and b not in labels and labels[d] == ("negative",)
    assert applied.pool_rows == 1 and "negative" in out.classes


def test_undo_walks_back_to_undecided(run):
    run_dir, _, preds = run
    s = ReviewSession(run_dir)
    s.decide(preds.paths[0], "exclude")
    assert s.undo() == {"path": preds.paths[0], "decision": None}
    assert s.undo() == {"path": None, "decision": None}
    assert corr.read_corrections(run_dir / "corrections.csv") == []


def test_bad_decisions_get_4xx_with_the_reason(run):
    run_dir, _, preds = run
    c = client_for(run_dir)
    p = preds.paths[0]
    cases = [({"path": p, "action": "delete"}, 400, "not one of keep"),
             ({"path": p, "action": "relabel", "labels": ["purple"]}, 400, "not a class"),
             ({"path": p, "action": "relabel", "labels": []}, 400, "exactly one class"),
             ({"path": p, "action": "relabel", "labels": "red"}, 400, "list of class names"),
             ({"path": "/etc/passwd", "action": "exclude"}, 404, "not an image"),
             ({"action": "keep"}, 400, "needs \"path\"")]
    for body, status, text in cases:
        r = c.post("/api/decision", json=body)
        assert r.status_code == status and text in r.json()["error"], (body, r.text)
    r = c.post("/api/decision", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert not (run_dir / "corrections.csv").exists()


def test_only_images_of_the_tables_are_served(run, tmp_path):
    run_dir, data, preds = run
    c = client_for(run_dir)
    r = c.get("/api/image", params={"path": preds.paths[2]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == Path(preds.paths[2]).read_bytes()
    dup = c.get("/api/image", params={"path": preds.paths[1]})  # a duplicate, also listed
    assert dup.status_code == 200
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(Path(preds.paths[0]).read_bytes())
    for bad in ["/etc/passwd", str(run_dir / "config.yaml"), str(secret),
                preds.paths[2] + "/../../../secret.jpg", str(data / "blue" / ".." / ".." / "secret.jpg"),
                "../secret.jpg", "", "blue/blue_000.jpg"]:
        r = c.get("/api/image", params={"path": bad})
        assert r.status_code == 404 and "not an image of this review" in r.json()["error"], bad
    assert c.get("/api/image/../../etc/passwd").status_code == 404
    assert c.get("/api/heatmap", params={"path": "/etc/passwd"}).status_code == 404
    page = c.get("/")
    assert page.status_code == 200 and "imgclf review" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere


def test_a_cross_validation_folder(tmp_path):
    run_dir, data, preds = fake_run(tmp_path)
    cv = tmp_path / "cv"
    cv.mkdir()
    TrainConfig(data=str(data), folds=2).to_yaml(cv / "cv_config.yaml")
    with open(cv / "oof_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "fold", "target", "predicted", *[f"prob_{c}" for c in CLASSES], "loss"])
        for i, row in enumerate(preds.to_rows()):
            w.writerow([row["path"], i % 2, row["target"], row["predicted"],
                        *[row[f"prob_{c}"] for c in CLASSES], row["loss"]])
    s = ReviewSession(cv)
    assert s.kind == "cv" and s.items[preds.paths[1]]["fold"] == 1
    assert "mined" not in s.queues and s.queue("label_issues")[0]["path"] == preds.paths[1]
    s.decide(preds.paths[1], "relabel", ["red"])
    assert (cv / "corrections.csv").is_file()


def test_multi_label_decisions_are_label_sets(tmp_path):
    data = make_color_dataset(tmp_path / "data", per_class=2, size=24)
    run_dir = tmp_path / "ml"
    run_dir.mkdir()
    TrainConfig(data=str(data), multi_label=True).to_yaml(run_dir / "config.yaml")
    paths = sorted(str(p) for p in data.glob("*/*.jpg"))
    targets = np.array([[i % 3 == j for j in range(3)] for i in range(len(paths))], dtype=int)
    probs = np.where(targets, 0.7, 0.2)
    probs[0] = [0.1, 0.9, 0.9]
    evaluation.Predictions(paths, CLASSES, probs, targets, multi_label=True).to_csv(
        run_dir / "predictions.csv")
    (run_dir / "metrics.json").write_text(json.dumps({"task": "multi_label"}))
    s = ReviewSession(run_dir)
    assert s.multi_label and "label_issues" not in s.queues and s.negative_label is None
    assert s.queue("top_losses")[0]["predicted"] == ["green", "red"]
    assert s.decide(paths[0], "relabel", ["red", "green"])["labels"] == ["green", "red"]
    assert s.decide(paths[1], "relabel", [])["labels"] == []
    assert s.decide(paths[2], "negative")["labels"] == []
    rows = {c.path: (c.action, c.labels) for c in corr.read_corrections(s.corrections_path)}
    assert rows == {paths[0]: ("relabel", "green red"), paths[1]: ("relabel", ""),
                    paths[2]: ("negative", "")}


def test_damaged_corrections_file_stops_the_session_with_the_lines(run):
    run_dir, _, _ = run
    (run_dir / "corrections.csv").write_text("path,action,labels,time,source\nx.jpg,zap,,,data\n")
    with pytest.raises(DataError, match="line 2: action 'zap'"):
        ReviewSession(run_dir)
    with pytest.raises(ImgclfError, match="neither a finished run"):
        ReviewSession(run_dir / "mining")


def test_cli_review_refuses_a_taken_port_and_a_non_run(run, monkeypatch):
    from typer.testing import CliRunner

    from imgclf.cli.app import app, main

    run_dir, _, _ = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ImgclfError, match=f"cannot listen on 127.0.0.1:{port}"):
            CliRunner().invoke(app, ["review", str(run_dir), "--port", str(port)],
                               catch_exceptions=False)
    monkeypatch.setattr("sys.argv", ["imgclf", "review", str(run_dir / "nothing")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# With a trained tiny run


@pytest.mark.slow
def test_heatmap_of_a_trained_run(tiny_run):
    c = client_for(tiny_run.path)
    state = c.get("/api/state").json()
    assert state["heatmaps"] is True
    path = next(iter(state["items"]))
    r = c.get("/api/heatmap", params={"path": path})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get("/api/heatmap", params={"path": path, "label": "purple"}).status_code == 400


@pytest.mark.slow
def test_train_with_corrections_from_a_review(tiny_run, color_data, tmp_path):
    from imgclf import api

    s = ReviewSession(tiny_run.path)
    valid = s.preds.paths
    train_imgs = sorted(set(map(str, color_data.glob("*/*.jpg"))) - set(valid))
    # Decisions on validation images through the session; a training image added by hand.
    s.decide(valid[0], "exclude")
    s.decide(valid[1], "relabel", ["green" if "red" in valid[1] else "red"])
    shutil.copy(tiny_run.path / "corrections.csv", tmp_path / "c.csv")
    with open(tmp_path / "c.csv", "a", encoding="utf-8") as f:
        f.write(f"{train_imgs[0]},negative,,,data\n{train_imgs[1]},negative,,,data\n")
    run = api.train(color_data, out=str(tmp_path / "runs"), name="corrected", seed=0,
                    corrections=str(tmp_path / "c.csv"), **{**TINY, "epochs": 1})
    cfg = TrainConfig.from_yaml(run.path / "config.yaml")
    assert cfg.corrections == str(tmp_path / "c.csv")
    assert cfg.corrections_sha256 == corr.file_digest(tmp_path / "c.csv")
    notes = json.loads((run.path / "data_summary.json").read_text())["summary"]["notes"]
    assert any("1 relabelled, 1 excluded, 2 marked negative" in n for n in notes), notes
    assert run.load().classes == ["blue", "green", "negative", "red"]
    paths = [r["path"] for r in csv.DictReader(open(run.path / "predictions.csv"))]
    assert valid[0] not in paths and valid[1] in paths
    # A changed file refuses a resume instead of training on other labels (the run is made
    # to look interrupted: a finished one has nothing to resume).
    (run.path / "checkpoints" / "state.json").unlink()
    with open(tmp_path / "c.csv", "a", encoding="utf-8") as f:
        f.write(f"{train_imgs[2]},exclude,,,data\n")
    with pytest.raises(DataError, match="changed since the run recorded it"):
        api.train(resume=run.path)


@pytest.mark.slow
def test_mine_with_corrections(tiny_run, color_data, tmp_path, monkeypatch):
    from imgclf.commands import train as train_cmd
    from imgclf.commands.mine import mine

    monkeypatch.setattr(train_cmd, "write_report", lambda run_dir: None)  # heatmaps: slow
    run_dir = Path(shutil.copytree(tiny_run.path, tmp_path / "run"))
    pool = make_color_dataset(tmp_path / "pool", per_class=6, size=40, classes=("gray",))
    pool_imgs = sorted(str(p.resolve()) for p in pool.glob("*/*.jpg"))
    valid = [r["path"] for r in csv.DictReader(open(run_dir / "predictions.csv"))]
    train_imgs = sorted(set(map(str, color_data.glob("*/*.jpg"))) - set(valid))
    f = tmp_path / "c.csv"
    corr.write_corrections(f, [Correction(train_imgs[0], "negative"),
                               Correction(valid[0], "relabel", "green" if "red" in valid[0] else "red"),
                               Correction(pool_imgs[0], "exclude", source="pool"),
                               Correction(str(tmp_path / "nowhere.jpg"), "keep", source="pool")])
    with pytest.raises(DataError, match="line 5: .*nowhere.jpg' is not an image of the mining pool"):
        mine(run_dir, pool, rounds=0, epochs=1, per_round=2, initial=2, corrections=str(f))
    rows = corr.read_corrections(f)[:3]
    corr.write_corrections(f, rows)
    mine(run_dir, pool, rounds=0, epochs=1, per_round=2, initial=2, corrections=str(f))
    split = json.loads((run_dir / "mining" / "pool.json").read_text())
    state = json.loads((run_dir / "mining" / "manifest.json").read_text())
    assert split["removed"] == [pool_imgs[0]] and split["corrections_sha256"] == corr.file_digest(f)
    assert pool_imgs[0] not in split["mining"] + split["valid"]
    assert split["marked_negatives"] == [train_imgs[0]]
    mined = state["rounds"][0]["mined"]
    assert mined[0] == {"path": train_imgs[0], "predicted": None, "confidence": None,
                        "source": "corrections"} and len(mined) == 3
    assert state["options"]["corrections"] == str(f.resolve())
    # The review of the mined run lists the marked image with the mined ones, as a data image.
    s = ReviewSession(run_dir)
    assert s.items[train_imgs[0]]["source"] == "data" and s.items[train_imgs[0]]["predicted"] == []
    assert s.items[mined[1]["path"]]["source"] == "pool"
    # The file is fixed once mining has started.
    corr.write_corrections(f, rows[:2])
    with pytest.raises(DataError, match="not the corrections file this mining started with"):
        mine(run_dir, corrections=str(f))


# ---------------------------------------------------------------------------------------------
# The page in Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


class LiveServer:
    """The review app on 127.0.0.1 in a thread (uvicorn), for the browser."""

    def __init__(self, run_dir: Path):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(ReviewSession(run_dir)), host="127.0.0.1",
                                port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the review server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def open_browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_keyboard_review_in_chromium(run):
    sync_api = pytest.importorskip("playwright.sync_api")
    run_dir, _, preds = run
    with LiveServer(run_dir) as url, sync_api.sync_playwright() as pw:
        browser = open_browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#tabs button.active")
            assert page.text_content("#position") == "1 / 3"
            assert page.text_content("#given").startswith("blue")
            # Relabel three images with number keys: 3 = red, 2 = green, 1 = blue.
            for key in ("3", "2", "1"):
                before = page.text_content("#position")
                page.keyboard.press(key)
                page.wait_for_function(f"document.getElementById('position').textContent != '{before}'"
                                       " || document.getElementById('decided-total').textContent == '3'")
            page.wait_for_function("document.getElementById('decided-total').textContent == '3'")
            # The next queue (top losses): its 4th image gets excluded with x.
            page.keyboard.press("q")
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            assert page.text_content("#position") == "4 / " + str(len(preds.paths))
            excluded = page.get_attribute("#path", "title")
            page.keyboard.press("x")
            page.wait_for_function("document.getElementById('decided-total').textContent == '4'")
            counter = page.text_content("#counter")
            assert "3 relabel" in counter and "1 exclude" in counter
            # Reload: the decisions come back from the server, shown on each image.
            page.reload()
            page.wait_for_selector("#tabs button.active")
            assert page.text_content("#decided-total") == "4"
            page.click("#tabs button[data-queue=label_issues]")
            seen = []
            for i in range(3):
                seen.append(page.text_content("#decision"))
                page.keyboard.press("ArrowRight")
            assert seen == ["Relabel → red", "Relabel → green", "Relabel → blue"]
            page.click("#tabs button[data-queue=top_losses]")
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            assert page.text_content("#decision") == "Exclude"
            # u takes back the last decision.
            page.keyboard.press("u")
            page.wait_for_function("document.getElementById('decided-total').textContent == '3'")
            page.keyboard.press("x")
            page.wait_for_function("document.getElementById('decided-total').textContent == '4'")
            assert not errors, errors
        finally:
            browser.close()
    rows = list(csv.DictReader(open(run_dir / "corrections.csv", encoding="utf-8")))
    got = {r["path"]: (r["action"], r["labels"]) for r in rows}
    issues = [preds.paths[i] for i in (1, 3, 8)]
    assert got == {issues[0]: ("relabel", "red"), issues[1]: ("relabel", "green"),
                   issues[2]: ("relabel", "blue"), excluded: ("exclude", "")}
