"""Mining settings, results and the state kept in `<run>/mining/` (manifest, snapshots, weights)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from imgclf.commands.run import Run
from imgclf.config import LOGGERS, parse_words, refuse_unknown
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write_bytes, atomic_write_json
from imgclf.rundir import read_json


MINING_DIR = "mining"
MANIFEST_VERSION = 1
# Pool images decoded and scored at a time: memory stays bounded whatever the pool's size.
SCORE_CHUNK = 512
# Files of a run that mining rewrites; copied to mining/original/ before the first round.
_RUN_FILES = ("model/model.json", "model/weights.safetensors", "metrics.json", "metrics.csv",
              "predictions.csv", "thresholds.json")
# Settings that define the pool split and round 0; a rerun must not change them.
_FIXED = ("pool", "valid_negatives", "pool_valid_pct", "seed", "negative_label", "initial",
          "corrections")
# Fixed options that name files: compared as absolute paths.
_PATHS = ("pool", "valid_negatives", "corrections")


@dataclass
class MineOptions:
    """Settings of `imgclf mine` (the CLI flags have the same names with dashes).

    Attributes:
        pool: Folder of unlabelled images that contain none of the classes.
        per_round: Hard negatives added to training per round.
        rounds: Mining rounds after round 0.
        epochs: Whole-network epochs per round, after the head-only ones.
        initial: Pool images that seed a new negative class in round 0 (None: `per_round`).
        negative_label: Name of the negative class (single-label runs).
        valid_negatives: Folder of held-out negatives V; when given, the whole pool is mined.
        pool_valid_pct: Fraction of the pool held out as V when `valid_negatives` is None.
        patience: Stop after this many rounds without a better validation score.
        lr: Peak learning rate given to the fine-tune recipe (None: the rates of the run's own
            whole-network stage).
        freeze_epochs: Head-only epochs on cached body features before each round's
            whole-network epochs (the training recipe's frozen stage; pretrained runs only).
            The head learns the negative class without moving the body, which keeps the
            positive classes' accuracy; the whole-network epochs then remove the false
            positives a linear head on fixed features cannot (measured in
            benchmarks/mining.py). Both 0: rounds only evaluate.
        batch_size: Images per forward pass when scoring the pool.
        seed: Seed of the U/V split, the round-0 picks and training (None: the run's seed).
        logger: Experiment trackers the rounds are logged to (None: those of the run's
            config.yaml, which continue the run's tracked run).
        corrections: Corrections CSV of `imgclf review`, applied to the labelled images and
            the pool when mining starts (see imgclf.commands.mine.corrected).
    """

    pool: str
    per_round: int = 10
    rounds: int = 3
    epochs: int = 2
    initial: int | None = None
    negative_label: str = "negative"
    valid_negatives: str | None = None
    pool_valid_pct: float = 0.2
    patience: int = 2
    lr: float | None = None
    freeze_epochs: int = 1
    batch_size: int = 64
    seed: int = 42
    logger: list[str] | None = None
    corrections: str | None = None

    def check(self) -> None:
        """Raise ImgclfError on values that cannot work, naming the flag."""
        if self.per_round < 1:
            raise ImgclfError(f"--per-round must be at least 1, not {self.per_round}")
        if self.rounds < 0 or self.epochs < 0 or self.freeze_epochs < 0:
            raise ImgclfError("--rounds, --epochs and --freeze-epochs cannot be negative")
        if self.initial is not None and self.initial < 0:
            raise ImgclfError(f"--initial cannot be negative, not {self.initial}")
        if self.patience < 1:
            raise ImgclfError(f"--patience must be at least 1, not {self.patience}")
        if not 0.0 < self.pool_valid_pct < 1.0 and self.valid_negatives is None:
            raise ImgclfError(f"--pool-valid-pct must be between 0 and 1 (exclusive), not "
                              f"{self.pool_valid_pct}; or pass --valid-negatives DIR")
        if not self.negative_label.strip():
            raise ImgclfError("--negative-label cannot be empty")
        for name in self.logger or []:
            if name not in LOGGERS:
                raise ImgclfError(f"--logger {name!r} is not one of {' | '.join(LOGGERS)}")


@dataclass
class MiningResult:
    """What `mine` did.

    Attributes:
        run: The run, whose bundle is now the best round's model.
        rounds: Per-round rows as in mining/rounds.json.
        best_round: The round whose model was kept.
        stop_reason: Why mining stopped, in words.
        baseline: The run's model before mining, on the same validation set.
    """

    run: Run
    rounds: list[dict]
    best_round: int
    stop_reason: str
    baseline: dict


def _mining_dir(run_dir: Path) -> Path:
    return run_dir / MINING_DIR


def _read_json(path: Path) -> dict | None:
    return read_json(path, fix=f"remove {path.parent} to mine again from the start")


def _save_manifest(mdir: Path, manifest: dict) -> None:
    atomic_write_json(mdir / "manifest.json", manifest)


def _snapshot_original(run_dir: Path) -> None:
    """Copy the run's files that mining rewrites, so every round starts from the same model
    and `--restart` can put them back."""
    if not (run_dir / "model" / "model.json").is_file():
        raise ImgclfError(f"{run_dir} has no trained model (model/model.json): finish training "
                          f"first, e.g. `imgclf train --resume {run_dir}`")
    dest = _mining_dir(run_dir) / "original"
    for name in _RUN_FILES:
        src = run_dir / name
        if src.is_file():
            atomic_write_bytes(dest / name, src.read_bytes())


def _restore_original(run_dir: Path) -> None:
    src = _mining_dir(run_dir) / "original"
    for name in _RUN_FILES:
        if (src / name).is_file():
            atomic_write_bytes(run_dir / name, (src / name).read_bytes())
        elif name == "thresholds.json":
            (run_dir / name).unlink(missing_ok=True)


def _save_weights(path: Path, model) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state))


def _load_weights(path: Path, model) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ImgclfError(f"{path} is missing: the mining state is incomplete; rerun with "
                          "--restart to mine again from the start")
    model.load_state_dict(load_file(str(path)))


def _prune_weights(mdir: Path, keep: set[str]) -> None:
    for p in mdir.glob("round_*.safetensors"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def options_from_file(path: str | Path) -> dict:
    """The mining settings of a YAML file (MineOptions' field names), unknown names refused
    with the closest one."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ImgclfError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ImgclfError(f"{path}: not a readable settings file{at}") from None
    if not isinstance(raw, dict):
        raise ImgclfError(f"{path}: expected settings as `name: value` lines")
    refuse_unknown(raw, [f.name for f in dataclasses.fields(MineOptions)], what="setting",
                   where=f"{path}: ")
    if isinstance(raw.get("logger"), str):
        raw["logger"] = parse_words(raw["logger"])
    return raw


def _resolve_options(manifest: dict | None, given: dict) -> MineOptions:
    """Options of this invocation: the manifest's fixed settings, checked against `given`."""
    if manifest is None:
        opts = MineOptions(**{k: v for k, v in given.items() if v is not None})
        for key in _PATHS:
            if getattr(opts, key) is not None:
                setattr(opts, key, str(Path(getattr(opts, key)).resolve()))
        if opts.initial is None:
            opts.initial = opts.per_round
        return opts
    saved = manifest["options"]
    for key in _FIXED:
        value = given.get(key)
        if value is None:
            continue
        if key in _PATHS:
            value = str(Path(value).resolve())
        if value != saved.get(key):
            raise ImgclfError(
                f"this run was mined with {key.replace('_', '-')}={saved.get(key)!r}, not "
                f"{value!r}: pass the same value to continue, or --restart to mine again from "
                "the start")
    merged = dict(saved)
    merged.update({k: v for k, v in given.items() if v is not None and k not in _FIXED})
    return MineOptions(**merged)
