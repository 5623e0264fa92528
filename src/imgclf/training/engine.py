"""The training engine: everything that touches Lightning, and nothing else does.

`ClassifierModule` (a network, its loss and a one-cycle schedule), the `History` callback that
writes metrics.csv rows, the Trainer factory, interruptible fits, atomic and pickle-free
checkpoints, and the resume callbacks (`ResumeState`, `StepCheckpoint`; their seeded sampler and
dataset are in `imgclf.training.resume`). The recipe (`imgclf.training.fine_tune`) and the
commands reach Lightning only through this module, so swapping the Trainer for Fabric touches
one file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch import seed_everything  # noqa: F401 (re-exported for the commands)
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from torch import nn

from imgclf.data.transforms import Preprocess, normalize
from imgclf.errors import ImgclfError
from imgclf.io import atomic_write
from imgclf.training import models
from imgclf.training.distributed import restore_order
from imgclf.training.ema import ema_decay, frozen_copy, update_average
from imgclf.training.epochs import Best, EpochRow, score_validation
from imgclf.training.resume import ResumableSampler, mix_seed, seed_all
from imgclf.training.schedule import cycle_window, one_cycle, stretch
from imgclf.training.task import Task

class ClassifierModule(L.LightningModule):
    """A network, its loss and a one-cycle schedule over parameter groups (rates and AdamW's
    beta1 set before every step from `one_cycle` of the step Lightning counts).

    Args:
        net: Maps a batch to logits (the whole model, or only its classifier on features).
        task: Loss, activation and metrics.
        groups: Parameter groups, earliest layers first; each gets its own peak rate.
        lrs: Peak learning rate per group.
        pct_start: Fraction of steps spent warming up.
        div: Initial rate is peak / div.
        final_div: Final rate is peak / final_div.
        weight_decay: AdamW weight decay.
        preprocess: When given, inputs are uint8 images normalised with its mean/std.
        class_weight: Optional per-class loss weights.
        batch_transform: Optional (x, y, key) -> (x, y) on training batches (e.g. mixup);
            its `epoch` attribute, if any, is kept at the run's epoch number.
        epoch_offset: Run epoch number of this fit's first epoch (earlier stages' epochs).
        stage_index: Distinguishes fits of one run in the keys given to `batch_transform`.
        device_augment: Optional (x, key) -> x run on the device before `batch_transform`
            (random crops of presized squares; see imgclf.augment.BatchCrop).
        cycle: (first epoch, total epochs) when this fit is one stage of a one-cycle spanning
            several fits (progressive resizing); None: the one-cycle covers this fit alone.
        exact_validation: Validate in float32 as `predict` runs (else at training precision:
            for stages whose epochs cannot become the saved model).
        freeze_bn: Keep BatchNorm layers on their running statistics while the rest trains
            (see `batchnorm_mode`).
        ema_halflife: Validate (and keep) an exponential moving average of the weights whose
            half-life is this many epochs, starting from the weights the fit starts with;
            0 validates the trained weights themselves.
    """

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        groups: list[list[nn.Parameter]],
        lrs: list[float],
        pct_start: float = 0.3,
        div: float = 25.0,
        final_div: float = 1e5,
        weight_decay: float = 0.01,
        preprocess: Preprocess | None = None,
        class_weight: torch.Tensor | None = None,
        batch_transform: Callable | None = None,
        epoch_offset: int = 0,
        stage_index: int = 0,
        device_augment: Callable | None = None,
        cycle: tuple[int, int] | None = None,
        exact_validation: bool = True,
        freeze_bn: bool = False,
        ema_halflife: float = 0.0,
    ):
        super().__init__()
        self.ema_halflife = float(ema_halflife)
        # A registered copy, so Lightning checkpoints and restores it with the network and a
        # resumed fit averages exactly as the uninterrupted one.
        self.ema = frozen_copy(net) if self.ema_halflife > 0 else None
        self._ema_decay = 0.0
        self.freeze_bn = freeze_bn
        self.cycle, self.knots = cycle, None  # knots: a time budget's re-plans (replan.py)
        # The epochs the cycle was first planned with, where a re-plan changed them since.
        self.planned_epochs: int | None = None
        self.exact_validation = exact_validation
        self.net = net
        self.task = task
        self.groups = groups
        self.lrs = lrs
        self.pct_start, self.div, self.final_div = pct_start, div, final_div
        self.weight_decay = weight_decay
        self.preprocess = preprocess
        self.class_weight = class_weight
        self.batch_transform = batch_transform
        self.epoch_offset, self.stage_index = epoch_offset, stage_index
        self.device_augment = device_augment
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        self.last_val: tuple[np.ndarray, np.ndarray] | None = None
        self.last_metrics: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.net, x)

    def _run(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.preprocess is not None:
            x = normalize(x, self.preprocess.mean, self.preprocess.std)
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x)

    @property
    def cycle_total(self) -> int:
        """Steps in the one-cycle this fit walks (set when its optimizer is configured)."""
        return int(self._cycle_total)

    @property
    def validated_net(self) -> nn.Module:
        """The weights validation scores: the moving average when there is one."""
        return self.ema if self.ema is not None else self.net

    def train(self, mode: bool = True):
        # fine_tune freezes BatchNorm before the fit and Lightning keeps the modes it is given;
        # should anything switch the module to train mode, BatchNorm stays on its statistics.
        super().train(mode)
        if mode and self.freeze_bn:
            models.freeze_batchnorm_statistics(self.net)
        return self

    def on_train_epoch_start(self) -> None:
        if hasattr(self.batch_transform, "epoch"):
            self.batch_transform.epoch = self.epoch_offset + self.current_epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.device_augment is not None:
            x = self.device_augment(x, (self.stage_index, self.global_step))
        if self.batch_transform is not None:
            # Keyed by the step Lightning restores from a checkpoint, so resuming mixes alike.
            x, y = self.batch_transform(x, y, (self.stage_index, self.global_step))
        weight = self.class_weight.to(self.device) if self.class_weight is not None else None
        loss = self.task.loss(self(x), y, weight)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=len(x))
        return loss

    def validation_step(self, batch, batch_idx):
        # Batches may carry each image's dataset position (distributed.IndexedDataset).
        x, y = batch[0], batch[1]
        # Validation runs in float32, as `predict` does, so the numbers it reports are exactly
        # what the saved bundle reproduces; epochs that cannot be saved need no such exactness.
        exact = torch.autocast(device_type=self.device.type, enabled=False) \
            if self.exact_validation else contextlib.nullcontext()
        with exact:
            logits = self._run(self.validated_net,
                               x.float() if self.preprocess is None else x).float()
        self._val_logits.append(logits.detach())
        self._val_targets.append(y.detach())
        if len(batch) > 2:
            self._val_index.append(batch[2].detach())

    def on_validation_epoch_start(self) -> None:
        self._val_logits, self._val_targets, self._val_index = [], [], []

    def on_validation_epoch_end(self) -> None:
        logits = torch.cat(self._val_logits) if self._val_logits else torch.zeros(0)
        targets = torch.cat(self._val_targets) if self._val_targets else torch.zeros(0)
        if self.trainer.world_size > 1:
            logits = _gather_uneven(self, logits)
            targets = _gather_uneven(self, targets)
            if self._val_index:
                # Shards interleave the images and pad with repeats: restore the dataset's
                # order, once per image, so metrics and predictions.csv cover the whole set.
                index = _gather_uneven(self, torch.cat(self._val_index))
                logits, targets = restore_order(index, logits, targets)
        probs, y, flat = score_validation(self.task, logits, targets)
        self.last_val = (probs, y)
        self.last_metrics = flat
        for k, v in flat.items():
            self.log(k, v, prog_bar=k in ("valid_loss", self.task.monitor), sync_dist=False)

    def configure_optimizers(self):
        if self.trainer.world_size > 1:
            # Only rank 0 ran the learning-rate finder; every rank must step with its rates.
            self.lrs = self.trainer.strategy.broadcast(list(self.lrs), src=0)
        param_groups = [{"params": [p for p in g if p.requires_grad], "lr": lr}
                        for g, lr in zip(self.groups, self.lrs)]
        param_groups = [g for g in param_groups if g["params"]]
        opt = torch.optim.AdamW(param_groups, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = int(self.trainer.max_epochs)
        if self.knots:  # re-planned (a resumed run): the cycle is still the one first planned
            total, epochs = int(self.knots[-1][1]) + 1, int(self.planned_epochs or epochs)
        self._peaks = [g["lr"] for g in param_groups]
        self._cycle_start, self._cycle_total = cycle_window(total, epochs, self.cycle)
        self.apply_schedule(opt, 0)
        if self.ema is not None:
            self._ema_decay = ema_decay(self.ema_halflife, total / max(1, epochs))
        return opt

    def apply_schedule(self, opt: torch.optim.Optimizer, step: int) -> None:
        """Set every group's rate and AdamW's beta1 for step `step` of this fit (one_cycle)."""
        for group, peak in zip(opt.param_groups, self._peaks):
            lr, momentum = one_cycle(self._cycle_start + stretch(step, self.knots),
                                     self._cycle_total, peak, self.pct_start, self.div,
                                     self.final_div)
            group["lr"], group["betas"] = lr, (momentum, *group["betas"][1:])

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # The rates are a function of the step Lightning counts (and restores on resume), so
        # a resumed fit needs no scheduler state.
        self.apply_schedule(self.trainer.optimizers[0], self.trainer.global_step)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: step checkpoints are written by callbacks before
        # the module's own batch-end hook, and must hold the average of the weights they hold.
        if self.ema is not None:
            self.update_ema()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Between steps the optimizer shows the next step's rate, as a torch scheduler leaves
        # it: History logs it as the epoch's rate.
        self.apply_schedule(self.trainer.optimizers[0], self.trainer.global_step)

    def update_ema(self) -> None:
        """Move the average towards the current weights by one step's share."""
        update_average(self.ema, self.net, self._ema_decay)


def _gather_uneven(module: L.LightningModule, t: torch.Tensor) -> torch.Tensor:
    """all_gather for shards of different lengths: pad to the longest, gather, trim."""
    n = torch.tensor([len(t)], device=module.device)
    sizes = module.all_gather(n).reshape(-1).tolist()
    longest = max(sizes)
    pad = torch.zeros((longest - len(t), *t.shape[1:]), dtype=t.dtype, device=t.device)
    gathered = module.all_gather(torch.cat([t, pad]))
    return torch.cat([gathered[i, : int(s)] for i, s in enumerate(sizes)])


class History(L.Callback):
    """Writes a metrics.csv row per epoch and offers each epoch to `best`.

    Args:
        rows: The run's rows so far (appended to in place).
        best: Best-epoch tracker shared by all stages.
        stage: Name of the stage written to the `stage` column.
        full_model: The whole model, whose weights `best` keeps.
        monitor: Metric that ranks epochs.
        on_row: Called after each row is added (writes metrics.csv and best weights).
        progress: The stage's `ResumeState`, whose loss and time cover an epoch interrupted
            and resumed; without it they come from Lightning and this process's clock.
        eligible: Whether this stage's epochs may become the best epoch (with progressive
            resizing only the final size's may: the bundle predicts at that size).
    """

    def __init__(self, rows: list[EpochRow], best: Best, stage: str, full_model: nn.Module,
                 monitor: str, on_row: Callable[[EpochRow, bool], None], progress=None,
                 eligible: bool = True):
        self.rows, self.best, self.stage = rows, best, stage
        self.full_model, self.monitor, self.on_row = full_model, monitor, on_row
        self.progress, self.eligible = progress, eligible
        self._t0 = time.perf_counter()
        # Rows of earlier stages come first; rows of this stage from before a resume follow.
        self._offset = sum(r.stage != stage for r in rows)

    def on_train_start(self, trainer, pl_module):
        # After a resume, rows written after the checkpoint was taken are trained again.
        del self.rows[self._offset + trainer.current_epoch:]

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or pl_module.last_val is None:
            return
        m = pl_module.last_metrics
        train_loss = trainer.callback_metrics.get("train_loss_epoch")
        seconds = time.perf_counter() - self._t0
        if self.progress is not None:
            train_loss, seconds = self.progress.mean_loss(), self.progress.seconds()
        if trainer.world_size > 1 and train_loss is not None:
            # Each rank saw its own shard: the epoch's loss is their mean.
            train_loss = trainer.strategy.reduce(
                torch.as_tensor(float(train_loss), device=pl_module.device), reduce_op="mean")
        lr = trainer.optimizers[0].param_groups[-1]["lr"] if trainer.optimizers else float("nan")
        row = EpochRow(
            epoch=self._offset + trainer.current_epoch, stage=self.stage, lr=float(lr),
            train_loss=float(train_loss) if train_loss is not None else float("nan"),
            valid_loss=float(m.get("valid_loss", float("nan"))),
            metrics={k: v for k, v in m.items() if k != "valid_loss"},
            seconds=round(seconds, 3),
        )
        self.rows.append(row)
        improved = self.eligible and self.best.offer(
            m.get(self.monitor, -math.inf), row.valid_loss, row.epoch, self.stage,
            pl_module.ema if pl_module.ema is not None else self.full_model,
            pl_module.last_val[0])
        self.on_row(row, improved)


# Warnings Lightning gives about what imgclf does on purpose.
_EXPECTED_WARNINGS = (
    ".*module\\(s\\) in eval mode.*",  # the frozen body's BatchNorm statistics must not move
    ".*exists and is not empty.*",  # checkpoints/ of a resumed run
    ".*does not have many workers.*",
    # ResumableSampler continues mid-epoch, which Lightning cannot see.
    ".*dataloader is not resumable.*",
    ".*LeafSpec.*",
    ".*_pytree.*",
)


@contextlib.contextmanager
def quiet_lightning():
    """Within the block, Lightning's start-up banners and expected warnings are silenced
    (imgclf reports on its own); logger levels and warning filters are restored on exit."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _EpochBar(RichProgressBar):
    """Lightning's bar counting a fit's epochs from 1 ("Epoch 1/1", not "Epoch 0/0")."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch + 1}/{self.trainer.max_epochs}"


class AtomicCheckpointIO(L.plugins.TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        """Tensors and plain data only (`weights_only=True`, whatever the caller asks): a
        checkpoint that needs anything else to unpickle is refused, never executed."""
        import pickle

        fix = ("delete it and resume again (the stage restarts from its beginning), or train "
               "anew")
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise ImgclfError(f"{path}: refused to load: it holds pickled code{what}, not just "
                              f"tensors, so imgclf did not write it; {fix}") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise ImgclfError(f"{path}: damaged checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}); {fix}") from None


def fit_interruptible(trainer: L.Trainer, *args, **kwargs) -> None:
    """`trainer.fit`, except that Ctrl-C ends the fit instead of the process.

    Lightning handles KeyboardInterrupt by marking the trainer interrupted and calling
    sys.exit(1); imgclf still has the best epoch in memory and writes its bundle and report, so
    the exit is caught here and the normal Ctrl-C behaviour restored.
    """
    import signal

    try:
        trainer.fit(*args, **kwargs)
    except SystemExit:
        if not trainer.interrupted:
            raise
    finally:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def make_trainer(epochs: int, precision: str, callbacks: list, cfg, root: Path | None,
                 **kwargs) -> L.Trainer:
    """A Lightning Trainer with imgclf's defaults, on the devices `cfg` names (build and fit it
    inside `quiet_lightning()` for a quiet one)."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=int(cfg.num_nodes),
        strategy=cfg.strategy,
        precision=precision,
        callbacks=[*callbacks, _EpochBar()],
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=bool(cfg.deterministic),
        default_root_dir=str(root) if root else tempfile.mkdtemp(prefix="imgclf-trainer-"),
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


def load_module_weights(model: nn.Module, ckpt_path: Path) -> None:
    """The network's weights from a Lightning checkpoint of a `ClassifierModule` around it."""
    state = AtomicCheckpointIO().load_checkpoint(ckpt_path)["state_dict"]
    model.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})


class ResumeState(L.Callback):
    """Where in an epoch training is, saved in every checkpoint; reseeds before every step.

    Args:
        sampler: The training sampler to position on restore (None: nothing to position).
        seed: The run's seed.
        batch_size: Images per step (to turn steps done into positions consumed).
    """

    def __init__(self, sampler: ResumableSampler | None, seed: int, batch_size: int):
        self.sampler, self.seed, self.batch_size = sampler, seed, batch_size
        self.epoch = self.batches = self.images = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._seconds_before = 0.0
        self._t0 = time.perf_counter()
        self._world_size = 1

    def setup(self, trainer, pl_module, stage):
        self._world_size = trainer.world_size  # setup runs before a checkpoint is restored

    def on_train_epoch_start(self, trainer, pl_module):
        # Not called when Lightning resumes in the middle of an epoch: the restored counts stay.
        self.epoch, self.batches, self.images, self._loss_sum = trainer.current_epoch, 0, 0, 0.0
        self._seconds_before, self._t0 = 0.0, time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seed_all(mix_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank, 1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n = len(batch[0])
        if isinstance(loss, torch.Tensor):
            # Kept on the device: reading it every step would synchronise a GPU.
            self._loss_sum = self._loss_sum + loss.detach().float() * n
        self.batches += 1
        self.images += n

    def mean_loss(self) -> float:
        """Mean training loss over the epoch so far, including steps before a resume."""
        return float(self._loss_sum) / self.images if self.images else float("nan")

    def seconds(self) -> float:
        """Training time of the epoch so far, including time before a resume."""
        return self._seconds_before + time.perf_counter() - self._t0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "images": self.images,
                "loss_sum": float(self._loss_sum), "seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch, self.batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self.images, self._loss_sum = int(state_dict["images"]), float(state_dict["loss_sum"])
        self._seconds_before, self._t0 = float(state_dict["seconds"]), time.perf_counter()
        # With several processes Lightning's wrapper shards the order, so the position cannot
        # be restored: the rest of the epoch is then drawn from the start of its order.
        if self.sampler is not None and self._world_size == 1:
            self.sampler.resume_at(self.epoch, self.batches * self.batch_size)


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` every N steps, except on an epoch's last step.

    Lightning treats a checkpoint taken after an epoch's last step as the end of that epoch, so
    resuming from it would skip the epoch's validation; the epoch-end checkpoint, written right
    after validation, covers that point instead.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
