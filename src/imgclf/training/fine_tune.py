"""The fine-tune recipe: frozen head on cached features, then the whole network on Lightning.

Stage "frozen": the body is frozen and in eval mode, so its output for an image never changes.
Its pooled features are computed once (one forward pass per augmented view) and the classifier is
trained on them in a plain loop (imgclf.training.frozen_head); the learning-rate finder runs on
the same features, so neither repeats the body. Stage "unfrozen": everything trains with one-cycle
and discriminative learning rates (earlier layer groups get smaller rates), as in fastai's
`fine_tune`. The best epoch by the validation metric is kept, together with its validation
probabilities, which become predictions.csv unchanged.

The Lightning side (module, callbacks, Trainer, checkpoints) is `imgclf.training.engine`; this
module does not import Lightning. Feature caching, BatchNorm adaptation and the saved start state
are `imgclf.training.features`. Messages go to the "imgclf" logger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf.data.datasets import make_loader, train_steps, with_transform
from imgclf.data.transforms import Preprocess, resized_eval_transform, train_transform
from imgclf.io import atomic_write_json
from imgclf.training import balance, budget, distributed, models, recipe
from imgclf.training.augment import BatchCrop
from imgclf.training.engine import (ClassifierModule, History, ModelCheckpoint, ResumeState,
                                    StepCheckpoint, fit_interruptible, load_module_weights,
                                    make_trainer, quiet_lightning)
from imgclf.training.epochs import Best, EpochRow
# autocast_context is imported for callers that run passes outside the Trainer (benchmarks).
from imgclf.training.features import (adapt_batchnorm, autocast_context,  # noqa: F401
                                      extract_features, load_start_state, load_tensors,
                                      save_tensors, start_state, time_training_steps)
from imgclf.training.frozen_head import ViewSampler, head_passes, lr_range_test, train_head
from imgclf.training.replan import Replanner
from imgclf.training.resume import ResumableSampler, SeededDataset
from imgclf.training.task import Task
# Re-exported: callers and benchmarks knew these as the recipe's.
from imgclf.training.techniques import (augment_on_device, batch_mixer,  # noqa: F401
                                        batchnorm_mode, discriminative_lrs, keep_presized,
                                        resolve_precision)

log = logging.getLogger("imgclf")


HEAD_FILE = "head.safetensors"
UNFROZEN_MAX_LR = 1e-3


@dataclass
class FitResult:
    """What the recipe produced (the model itself holds the best weights on return)."""

    rows: list[EpochRow]
    best: Best
    lr: float
    lr_find: dict | None
    precision: str
    interrupted: bool
    train_images_seen: int
    train_seconds: float
    plan: dict | None = None


@dataclass
class FitData:
    """Training and validation images for the recipe.

    `balance` is the resolved imbalance mode ("none", "weights" or "sampler"; see
    imgclf.balance): "weights" weights the loss in both stages; "sampler" draws class-balanced
    batches in the unfrozen stage and weights the loss of the frozen-head stage.
    """

    train: "torch.utils.data.Dataset"
    valid: "torch.utils.data.Dataset"
    y_train: torch.Tensor
    y_valid: torch.Tensor
    balance: str = "none"


@dataclass
class _Fit:
    """What the stages of one `fine_tune` call share; the rate and finder result change as
    stages run, and `save_state` writes the current ones."""

    model: nn.Module
    task: Task
    pre: Preprocess
    data: FitData
    cfg: object
    run_dir: Path | None
    on_row: Callable[[EpochRow, bool], None]
    rows: list[EpochRow]
    best: Best
    resume: dict
    precision: str
    device: torch.device
    lr: float | None
    lr_find: dict | None
    frozen: bool
    bn_mode: str
    valid_loader: DataLoader
    weight: torch.Tensor | None
    # Under DDP every process runs fine_tune; only global rank 0 caches features, runs the LR
    # finder, trains the frozen head and writes state (see imgclf.distributed).
    rank_zero: bool
    seen: int = 0
    # The time budget's end (time.monotonic()), and what the run measured to plan for it.
    deadline: float | None = None
    eval_img_s: float | None = None
    # How long the unfrozen stage runs and why (budget.plan_record), kept in state.json.
    plan: dict | None = None

    @property
    def ckpt_dir(self) -> Path | None:
        return Path(self.run_dir) / "checkpoints" if self.run_dir else None

    def save_state(self, stage: str, size_stage: int = 0) -> None:
        """Record in checkpoints/state.json where a resumed run picks up."""
        if self.ckpt_dir and self.rank_zero:
            atomic_write_json(self.ckpt_dir / "state.json",
                              {"stage": stage, "lr": self.lr, "lr_find": self.lr_find,
                               "size_stage": size_stage, "plan": self.plan})


def fine_tune(
    model: nn.Module,
    task: Task,
    pre: Preprocess,
    data: FitData,
    cfg,
    run_dir: Path | None,
    on_row: Callable[[EpochRow, bool], None],
    rows: list[EpochRow] | None = None,
    best: Best | None = None,
    resume: dict | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Train `model` with the fine-tune recipe; on return it holds the best epoch's weights.

    Args:
        model: timm model with its new head.
        task: Single- or multi-label.
        pre: Preprocessing (normalisation happens inside the module, on uint8 batches).
        data: Datasets yielding uint8 crops and their targets.
        cfg: The run's TrainConfig.
        run_dir: Where checkpoints go (None: nowhere).
        on_row: Called with each epoch's row and whether it is the best so far.
        rows: Rows of an interrupted run being resumed.
        best: Best epoch of an interrupted run being resumed.
        resume: State of an interrupted run: {"stage", "lr", "lr_find", "size_stage", "plan"}.
        deadline: With --time-budget, the time.monotonic() by which the run should have
            finished, report included; the unfrozen stage is planned to end in time for it.
    """
    resume = resume or {}
    precision = resolve_precision(cfg.precision, model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).to(memory_format=torch.channels_last)
    t_start = time.perf_counter()
    fit = _Fit(
        model, task, pre, data, cfg, run_dir, on_row, rows if rows is not None else [],
        best or Best(), resume, precision,
        device, lr=resume.get("lr") if resume.get("lr") is not None else (
            None if cfg.lr == "auto" else float(cfg.lr)),
        lr_find=resume.get("lr_find"), frozen=cfg.pretrained and cfg.freeze_epochs > 0,
        bn_mode=batchnorm_mode(cfg),
        valid_loader=make_loader(data.valid, cfg.batch_size, train=False, workers=cfg.workers),
        weight=(balance.class_weights(data.y_train, len(task.classes))
                if data.balance in ("weights", "sampler") else None),
        rank_zero=distributed.is_rank_zero(int(cfg.num_nodes)), deadline=deadline,
        plan=resume.get("plan"))
    interrupted = False
    if fit.frozen and resume.get("stage") not in ("unfrozen", "done") and fit.rank_zero:
        interrupted = _frozen_stage(fit)
    elif fit.frozen and fit.ckpt_dir and (fit.ckpt_dir / HEAD_FILE).is_file():
        load_start_state(model, load_tensors(fit.ckpt_dir / HEAD_FILE))
    if (not fit.frozen and fit.bn_mode == "adapt" and fit.rank_zero
            and not (fit.ckpt_dir and (fit.ckpt_dir / "last.ckpt").is_file())):
        _adapt_batchnorm(fit)
    if fit.lr is None:
        fit.lr, fit.lr_find = (3e-3 if not cfg.pretrained else 1e-3), None
        log.info(f"lr = {fit.lr:.1e} (default for "
                 f"{'random init' if not cfg.pretrained else 'fine-tuning'})")
    epochs, batches = (0, None) if interrupted else _unfrozen_length(fit)
    stages = recipe.size_schedule(getattr(cfg, "sizes", None), epochs,
                                  getattr(cfg, "stage_epochs", None), pre.size)
    if not interrupted and epochs > 0 and resume.get("stage") != "done":
        interrupted = _unfrozen_stages(fit, stages, batches)
    if fit.best.state is not None:
        model.load_state_dict(fit.best.state)
    models.set_body_trainable(model, True)
    model.eval()
    return FitResult(rows=fit.rows, best=fit.best, lr=float(fit.lr), lr_find=fit.lr_find,
                     precision=precision, interrupted=interrupted, train_images_seen=fit.seen,
                     train_seconds=time.perf_counter() - t_start, plan=fit.plan)


def _adapt_batchnorm(fit: _Fit) -> None:
    """--batchnorm adapt: re-estimate the statistics on augmented training images."""
    adapt_batchnorm(fit.model, make_loader(fit.data.train, fit.cfg.batch_size, train=True,
                                           workers=fit.cfg.workers, seed=fit.cfg.seed + 1),
                    fit.pre, fit.device)


def _frozen_stage(fit: _Fit) -> bool:
    """The head on cached features of the frozen body (the LR finder first, when the rate is
    "auto"); returns whether Ctrl-C ended it.

    The stage has no checkpoint of its own: after a kill it runs again from the start (its rows
    too), which gives the same head since it is seeded throughout.
    """
    cfg, data, model = fit.cfg, fit.data, fit.model
    fit.rows.clear()
    models.set_body_trainable(model, False)
    head = models.classifier(model)
    views = max(1, cfg.freeze_epochs)
    if fit.bn_mode == "adapt":
        _adapt_batchnorm(fit)
    train_plain = make_loader(data.train, cfg.batch_size, train=False, workers=cfg.workers)
    try:
        # One block of views x images rows, memory-mapped above the memory budget.
        feats, ys = extract_features(model, train_plain, fit.pre, fit.precision, fit.device,
                                     desc="Caching body features", views=views)
        t_valid = time.perf_counter()
        f_valid, y_valid = extract_features(model, fit.valid_loader, fit.pre, "32-true",
                                            fit.device, desc="Caching validation features")
        fit.eval_img_s = len(data.valid) / max(time.perf_counter() - t_valid, 1e-6)
        fit.seen += views * len(data.train) + len(data.valid)
        head.to("cpu")  # next to its cached features: a linear layer needs no accelerator
        if fit.lr is None:
            fit.lr, lrs_curve, loss_curve = lr_range_test(
                head, fit.task, feats, ys, cfg.batch_size, cfg.seed)
            fit.lr_find = {"lrs": lrs_curve.tolist(), "losses": loss_curve.tolist(),
                           "suggestion": fit.lr, "rule": "valley", "on": "frozen-body features"}
            log.info(f"Learning-rate finder (valley rule on cached features): lr = {fit.lr:.2e}")
    except KeyboardInterrupt:
        # Ctrl-C before the head has trained: the stage reruns whole on --resume, as after a kill.
        log.warning("Interrupted while caching features or finding the learning rate")
        model.to(fit.device)
        return True
    n = len(data.train)
    # ViewSampler walks the cached augmented views epoch by epoch; weighting the loss gives
    # balanced sampling's expected gradient without breaking that walk, so both modes use it.
    sampler = ViewSampler(n, views, cfg.seed, head_passes(n, cfg.batch_size))
    interrupted = train_head(
        head, fit.task, TensorDataset(feats, ys), (f_valid, y_valid),
        cfg.freeze_epochs, fit.lr, sampler, cfg.batch_size, fit.rows, fit.best, model,
        fit.on_row, class_weight=fit.weight)
    if fit.ckpt_dir and not interrupted and fit.rank_zero:
        # The unfrozen stage starts from this head and these BatchNorm statistics; keep
        # them until its first checkpoint.
        save_tensors(fit.ckpt_dir / HEAD_FILE, start_state(model))
        fit.save_state("unfrozen")
    model.to(fit.device)
    return interrupted


def _unfrozen_length(fit: _Fit) -> tuple[int, int | None]:
    """(epochs, batches per epoch or None for whole epochs) of the unfrozen stage.

    In order: the plan a resumed run recorded; the time budget's plan; --epochs; the frozen
    stage's score (budget.auto_epochs); budget.MAX_EPOCHS. Processes of a multi-process run
    must agree without talking, so they take --epochs or the fixed default.
    """
    cfg = fit.cfg
    if fit.plan:
        return int(fit.plan["epochs"]), fit.plan.get("batches") or None
    several = int(cfg.num_nodes) > 1 or distributed.wants_several_processes(cfg)
    batches = None
    if fit.deadline is not None:
        plan = _budget_plan(fit)
        log.info(plan.describe())
        epochs = plan.epochs
        batches = plan.batches if 0 < plan.batches < plan.steps_per_epoch else None
        fit.plan = budget.plan_record(plan, epochs, "time budget")
    elif cfg.epochs is not None or getattr(cfg, "sizes", None):
        epochs = recipe.default_epochs(cfg)
        fit.plan = budget.plan_record(None, epochs, "--epochs")
    elif (score := _frozen_score(fit)) is not None and not several:
        epochs = budget.auto_epochs(score)
        fit.plan = {**budget.plan_record(None, epochs, "frozen-stage score"),
                    "frozen_score": score}
        log.info(f"Unfrozen stage: {epochs} epochs (the frozen stage's validation "
                 f"{fit.task.monitor.removeprefix('valid_')} is {score:.3f}; "
                 "--epochs N to choose)")
    else:
        epochs = budget.MAX_EPOCHS
        fit.plan = budget.plan_record(None, epochs, "default")
    return epochs, batches


def _make_trainable(fit: _Fit) -> None:
    """What the unfrozen stage trains: the whole network but, with --freeze-early, the layers
    at 1/2 and 1/4 resolution (models.early_layer_params)."""
    models.set_body_trainable(fit.model, True)
    if fit.cfg.pretrained and getattr(fit.cfg, "freeze_early", False):
        for p in models.early_layer_params(fit.model):
            p.requires_grad = False


def _frozen_score(fit: _Fit) -> float | None:
    """The frozen stage's validation score, from its row (None when it did not run)."""
    rows = [r for r in fit.rows if r.stage == "frozen"] if fit.frozen else []
    score = rows[-1].metrics.get(fit.task.monitor) if rows else None
    return float(score) if score is not None else None


def _budget_plan(fit: _Fit) -> budget.Plan:
    """Time a few training steps of what the unfrozen stage trains, then plan what the time
    left buys."""
    cfg, data = fit.cfg, fit.data
    _make_trainable(fit)
    loader = make_loader(data.train, cfg.batch_size, train=True, workers=cfg.workers,
                         seed=cfg.seed + 3)
    step_s = time_training_steps(fit.model, loader, fit.pre, fit.precision, fit.device,
                                 freeze_bn=fit.bn_mode != "train")
    steps_per_epoch = train_steps(len(data.train), cfg.batch_size)
    # Without a frozen stage nothing has timed inference yet: a forward pass is about a
    # third of a training step (the backward pass costs about twice the forward).
    eval_img_s = fit.eval_img_s or 3 * cfg.batch_size / step_s
    costs = budget.Costs(
        left_s=fit.deadline - time.monotonic(), step_s=step_s, eval_img_s=eval_img_s,
        steps_per_epoch=steps_per_epoch, n_valid=len(data.valid),
        finish_s=budget.finish_seconds(len(data.valid), eval_img_s, int(cfg.tta or 0)))
    log.debug("time budget costs: %s", costs)
    return budget.plan_budget(costs)


def _replanner(fit: _Fit, n_train: int, k: int) -> Replanner | None:
    """With a time budget, what re-plans the stage after each epoch (imgclf.training.replan)."""
    if fit.deadline is None:
        return None
    eval_img_s, n_valid = fit.eval_img_s or 1e9, len(fit.data.valid)

    def record(epochs: int, batches: int, knots: list, replan: dict) -> None:
        # The cycle's length and the average's half-life stay those of the first plan.
        fit.plan.setdefault("planned_epochs", fit.plan["epochs"])
        fit.plan.update(epochs=epochs, batches=batches, knots=knots)
        fit.plan.setdefault("replans", []).append(replan)
        fit.save_state("unfrozen", k)

    finish_s = budget.finish_seconds(n_valid, eval_img_s, int(fit.cfg.tta or 0))
    return Replanner(fit.deadline, finish_s, n_valid / eval_img_s,
                     train_steps(n_train, fit.cfg.batch_size), record)


def _unfrozen_rates(fit: _Fit, n_groups: int) -> list[float]:
    """Peak rate per layer group for the unfrozen stage."""
    base = fit.lr / 2 if fit.frozen else fit.lr
    if fit.frozen and fit.cfg.lr == "auto":
        # The finder measured what the new head on fixed features tolerates, typically
        # 3e-3 to 1e-2; the pretrained body needs fastai's fine-tuning rate (its default
        # 2e-3 halved), or its first unfrozen epochs undo what it knew.
        base = min(base, UNFROZEN_MAX_LR)
    return (discriminative_lrs(base, n_groups, fit.cfg.lr_mult) if fit.cfg.pretrained
            else [base] * n_groups)


def _unfrozen_stages(fit: _Fit, stages: list, batches: int | None = None) -> bool:
    """The network (but --freeze-early's layers), one fit per progressive-resizing size (one
    fit without resizing), from the size a resumed run stopped at; returns whether Ctrl-C
    ended it."""
    cfg, model = fit.cfg, fit.model
    _make_trainable(fit)
    # Feature caching left the body in eval mode, and Lightning keeps submodules' modes: the
    # whole network must train here (batch norm, dropout), as it does after a resume.
    model.train()
    if fit.bn_mode != "train":
        # Lightning keeps the modes it is given (it calls no .train()), so this holds for
        # the whole fit, resumed ones included.
        models.freeze_batchnorm_statistics(model)
    groups = models.layer_groups(model, 3)
    lrs = _unfrozen_rates(fit, len(groups))
    mixer = batch_mixer(cfg, fit.task)
    sampler = (balance.balanced_sampler(fit.data.y_train, len(fit.task.classes), cfg.seed)
               if fit.data.balance == "sampler" else None)
    first = int(fit.resume.get("size_stage", 0)) if fit.resume.get("stage") == "unfrozen" else 0
    epoch_offset = (cfg.freeze_epochs if fit.frozen else 0) + sum(
        st.epochs for st in stages[:first])
    if len(stages) > 1:
        log.info("Progressive resizing: " + ", then ".join(
            f"{st.epochs} epoch{'s' if st.epochs != 1 else ''} at {st.size}px"
            for st in stages) + " (the best epoch is chosen among the last stage's)")
    for k in range(first, len(stages)):
        if _size_stage(fit, stages, k, first, groups, lrs, mixer, sampler, epoch_offset,
                       batches):
            return True
        epoch_offset += stages[k].epochs
    fit.save_state("done")
    return False


def _size_stage(fit: _Fit, stages: list, k: int, first: int, groups: list, lrs: list[float],
                mixer, sampler, epoch_offset: int, batches: int | None = None) -> bool:
    """One Lightning fit of the whole network at stage k's size (epochs of `batches` steps
    when a time budget shortened them); returns whether Ctrl-C ended it."""
    cfg, data, pre, model, ckpt_dir = fit.cfg, fit.data, fit.pre, fit.model, fit.ckpt_dir
    st = stages[k]
    name = "unfrozen" if len(stages) == 1 else f"unfrozen-{st.size}px"
    train_ds, valid_ds = data.train, data.valid
    if st.size != pre.size:
        train_ds = with_transform(data.train, train_transform(st.size))
        valid_ds = with_transform(data.valid, resized_eval_transform(
            st.size, pre.presize, pre.size / pre.presize))
    crop = None
    if augment_on_device(cfg):
        # The loader hands over whole presized squares; crops happen on the device.
        train_ds = with_transform(data.train, keep_presized)
        crop = BatchCrop(st.size, seed=cfg.seed)
    cycle = None
    if getattr(cfg, "stage_schedule", "continue") == "continue" and len(stages) > 1:
        # One one-cycle across the stages: each size takes over at the rate the last
        # ended with. From scratch, restarted warm-ups coincided with drops of 5-9
        # points at each boundary that the stage then spent its epochs recovering.
        cycle = (sum(x.epochs for x in stages[:k]), sum(x.epochs for x in stages))
        stage_lrs = list(lrs)
        pct, div = (0.3 if fit.frozen else 0.25), (5.0 if fit.frozen else 25.0)
    else:
        # Each stage is a one-cycle of its own. Later stages refine what the first
        # learned (as fastai's fine_tune at the larger size after fit_one_cycle at the
        # small one): their peak falls as 1/(k+1), and they warm up briefly from a
        # fifth of it.
        stage_lrs = [r / (k + 1) for r in lrs]
        pct = (0.3 if fit.frozen else 0.25) if k == 0 else 0.2
        div = 5.0 if fit.frozen or k > 0 else 25.0
    module = ClassifierModule(model, fit.task, groups, stage_lrs,
                              pct_start=pct, div=div, preprocess=pre,
                              class_weight=fit.weight if data.balance == "weights" else None,
                              batch_transform=mixer, epoch_offset=epoch_offset,
                              stage_index=k, device_augment=crop, cycle=cycle,
                              exact_validation=k == len(stages) - 1,
                              freeze_bn=fit.bn_mode != "train",
                              ema_halflife=float(getattr(cfg, "ema", 0) or 0))
    # Order and augmentation are functions of (seed, epoch, position), so a resumed run
    # sees exactly the batches the uninterrupted one would have (see imgclf.resume).
    order = ResumableSampler(len(train_ds), cfg.seed + 7919 * k, inner=sampler)
    train_loader = make_loader(SeededDataset(train_ds), cfg.batch_size, train=True,
                               workers=cfg.workers, seed=cfg.seed, sampler=order)
    progress = ResumeState(order, cfg.seed + 7919 * k, cfg.batch_size)
    replanner = _replanner(fit, len(train_ds), k)
    module.knots = (fit.plan or {}).get("knots")  # a resumed run replays its re-plans
    module.planned_epochs = (fit.plan or {}).get("planned_epochs")

    def on_row(row: EpochRow, improved: bool) -> None:
        fit.on_row(row, improved)
        if replanner is not None:
            replanner.after_epoch(trainer, module)
        epochs = int(trainer.max_epochs)  # a time budget's re-plan may have changed it
        if row.epoch == epoch_offset and epochs > 1:  # once the throughput is known
            left = (epochs - 1) * row.seconds + sum(
                x.epochs * row.seconds * (x.size / st.size) ** 2 for x in stages[k + 1:])
            end = left + budget.finish_seconds(len(data.valid), fit.eval_img_s or 1e9,
                                               int(cfg.tta or 0))
            log.info(f"First unfrozen epoch: {row.seconds:.0f} s; about {left:.0f} s of "
                     f"training left, {end:.0f} s to the run's end (report included)")

    callbacks: list = [progress, History(fit.rows, fit.best, name, model, fit.task.monitor,
                                         on_row, progress=progress,
                                         eligible=k == len(stages) - 1)]
    ckpt_name = "last" if k == 0 else f"last-stage{k}"
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(
            dirpath=str(ckpt_dir), filename=ckpt_name, save_last=False, save_top_k=-1,
            every_n_epochs=1, save_on_train_epoch_end=True,
            enable_version_counter=False))
        if cfg.checkpoint_every:
            callbacks.append(StepCheckpoint(
                dirpath=str(ckpt_dir), filename=ckpt_name, save_top_k=-1,
                every_n_train_steps=int(cfg.checkpoint_every),
                enable_version_counter=False))
    limits = {"limit_train_batches": int(batches)} if batches else {}
    if (fit.plan or {}).get("rule") == "time budget":
        limits["reload_dataloaders_every_n_epochs"] = 1  # re-planned epoch lengths apply
    with quiet_lightning():
        trainer = make_trainer(st.epochs, fit.precision, callbacks, cfg, fit.run_dir, **limits)
        indexed_valid_loader = make_loader(distributed.IndexedDataset(valid_ds),
                                           cfg.batch_size, train=False, workers=cfg.workers)
        ckpt = None
        if ckpt_dir and fit.resume.get("stage") == "unfrozen" and k == first:
            ckpt = ckpt_dir / f"{ckpt_name}.ckpt"
            previous = ckpt_dir / ("last.ckpt" if k == 1 else f"last-stage{k - 1}.ckpt")
            if not ckpt.is_file() and k > 0 and previous.is_file():
                # Killed between stages: start this stage from the last one's weights.
                load_module_weights(model, previous)
        fit.save_state("unfrozen", k)
        fit_interruptible(trainer, module, train_loader, indexed_valid_loader,
                          ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None,
                          weights_only=True)
    fit.seen += int(trainer.max_epochs) * (len(data.train) + len(data.valid))
    return trainer.interrupted
