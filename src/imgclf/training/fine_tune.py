"""The fine-tune recipe: frozen head on cached features, then the whole network on Lightning.

Stage "frozen": the body is frozen and in eval mode, so its output for an image never changes.
Its pooled features are computed once (one forward pass per augmented view) and the classifier is
trained on them in a plain loop (imgclf.frozen_head); the learning-rate finder runs on the same
features, so neither repeats the body. Stage "unfrozen": everything trains with one-cycle and
discriminative learning rates (earlier layer groups get smaller rates), as in fastai's
`fine_tune`. The best epoch by the validation metric is kept, together with its validation
probabilities, which become predictions.csv unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf import distributed, models
from imgclf.augment import BatchCrop
from imgclf.data.transforms import Preprocess, normalize
from imgclf.epochs import Best, EpochRow, score_validation
from imgclf.frozen_head import ViewSampler, head_passes, lr_range_test, train_head
from imgclf.io import atomic_write_json
from imgclf.resume import ResumableSampler, ResumeState, SeededDataset, StepCheckpoint
from imgclf.tasks import Task

log = logging.getLogger("imgclf")


class ClassifierModule(L.LightningModule):
    """A network, its loss and a one-cycle schedule over parameter groups.

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
    ):
        super().__init__()
        self.freeze_bn = freeze_bn
        self.cycle = cycle
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
        if self.preprocess is not None:
            x = normalize(x, self.preprocess.mean, self.preprocess.std)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        if self.freeze_bn:
            # Lightning puts the module in train mode before each epoch (and after validation).
            models.freeze_batchnorm_statistics(self.net)
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
            logits = self(x.float() if self.preprocess is None else x).float()
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
                from imgclf.distributed import restore_order

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
        start = 0
        if self.cycle is not None:
            # This fit is the part of a longer one-cycle from epoch cycle[0] of cycle[1].
            per_epoch = total // max(1, int(self.trainer.max_epochs))
            start, total = per_epoch * self.cycle[0], per_epoch * self.cycle[1]
        pct_start = self.pct_start
        if abs(pct_start * total - 1.0) < 1e-9:
            # OneCycleLR divides by zero when its warm-up ends exactly after one step
            # (e.g. 4 steps at pct_start 0.25); a hair longer changes nothing else.
            pct_start *= 1.01
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in param_groups], total_steps=total,
            pct_start=pct_start, div_factor=self.div,
            final_div_factor=self.final_div / self.div, cycle_momentum=True,
            base_momentum=0.85, max_momentum=0.95,
        )
        if start:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched.last_epoch = start - 1
                sched.step()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
            self.full_model, pl_module.last_val[0])
        self.on_row(row, improved)


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners; imgclf prints its own summary."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The frozen body is in eval mode on purpose (its batch-norm statistics must not move).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*_pytree.*")


def resolve_precision(precision: str, model: nn.Module) -> str:
    """The Lightning precision for "auto": mixed precision on CUDA; on CPUs with AMX, bf16 for
    models built of dense convolutions and float32 for depthwise-convolution models.

    Measured on this project's 2-core AMX machine (benchmarks/predict.py, batch 32, 224 px,
    channels_last, two runs): a resnet50 training step runs 9.9-12.1 img/s in bf16 against
    4.8-5.0 in float32, but tf_efficientnet_lite0 gains nothing (9.8-15.1 img/s in bf16
    against 14.5-15.2 in float32): its depthwise convolutions do not use the matrix units.
    """
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if models.cpu_supports_bf16() and not models.has_depthwise_convs(model):
        return "bf16-mixed"
    return "32-true"


def autocast_context(precision: str, device: torch.device):
    """The autocast matching a Lightning precision string, for passes outside the Trainer."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, pre: Preprocess, precision: str,
                     device: torch.device, desc: str = "Caching features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled body features of every batch (model in eval mode): ([N, F] float32, targets)."""
    from rich.progress import Progress

    model.eval()
    feats, targets = [], []
    with Progress(transient=True) as bar:
        task = bar.add_task(desc, total=len(loader.dataset))
        for x, y in loader:
            x = normalize(x.to(device), pre.mean, pre.std).contiguous(memory_format=torch.channels_last)
            with autocast_context(precision, device):
                f = models.pre_logits(model, x)
            feats.append(f.float().cpu())
            targets.append(y)
            bar.advance(task, len(x))
    return torch.cat(feats), torch.cat(targets)


ADAPT_IMAGES = 1024


def batchnorm_mode(cfg) -> str:
    """How BatchNorm layers behave when the body trains ("train" whenever not pretrained).

    "adapt": running statistics re-estimated on training images before the frozen stage caches
    its features, then held fixed while the body fine-tunes; "frozen": the pretrained
    (ImageNet) statistics held fixed; "train": statistics of each training batch, as in
    from-scratch training. Holding them fixed is what makes the unfrozen stage start from the
    model the frozen stage trained: with batch statistics, the pooled features under the new
    head jump the moment the body unfreezes (by 40% on magnetic_tiles, where the head's
    accuracy on them falls from 0.69 to 0.41; benchmarks/finetune_stability.py --diagnose).
    """
    mode = getattr(cfg, "batchnorm", "adapt") or "adapt"
    return mode if cfg.pretrained else "train"


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader: DataLoader, pre: Preprocess, device: torch.device,
                    max_images: int = ADAPT_IMAGES) -> int:
    """Re-estimate every BatchNorm layer's running statistics on (augmented) training images.

    A cumulative average over up to `max_images` images (momentum None), as
    `torch.optim.swa_utils.update_bn` computes it; written here because that helper runs the
    whole loader and cannot normalise uint8 batches. Returns the number of images used.
    """
    from rich.progress import Progress

    layers = models.batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in layers:
        m.train()
    seen = 0
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("Adapting BatchNorm statistics",
                                total=min(max_images, len(loader.dataset)))
            for x, _ in loader:
                x = x[: max_images - seen]
                x = normalize(x.to(device), pre.mean, pre.std).contiguous(
                    memory_format=torch.channels_last)
                models.pre_logits(model, x)
                seen += len(x)
                bar.advance(task, len(x))
                if seen >= max_images:
                    break
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def _scratch_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="imgclf-trainer-")


class AtomicCheckpointIO(L.plugins.TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed, so a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        from imgclf.io import atomic_write

        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=True):
        """Tensors and plain data only (`weights_only=True`, whatever the caller asks): a
        checkpoint that needs anything else to unpickle is refused, never executed."""
        import pickle

        from imgclf.errors import ImgclfError

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


HEAD_FILE = "head.safetensors"


def start_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the unfrozen stage starts from besides the pretrained body: the trained head and
    the BatchNorm statistics (re-estimated on the training data with --batchnorm adapt)."""
    head = {f"head.{k}": v for k, v in models.classifier(model).state_dict().items()}
    bn_ids = {id(m) for m in models.batchnorm_layers(model)}
    stats = {f"body.{name}.{b}": buf for name, m in model.named_modules() if id(m) in bn_ids
             for b, buf in m.named_buffers(recurse=False)}
    return {**head, **stats}


def load_start_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `start_state` (a file of head weights alone, as older runs wrote, works too)."""
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    models.classifier(model).load_state_dict(head or state)
    body = {k[5:]: v for k, v in state.items() if k.startswith("body.")}
    if body:
        model.load_state_dict(body, strict=False)


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A state dict as safetensors, atomically."""
    from safetensors.torch import save

    from imgclf.io import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict, or an ImgclfError naming the damaged file and the fix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from imgclf.errors import ImgclfError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ImgclfError(f"{path}: damaged or not a safetensors file ({e}): delete the run's "
                          "checkpoints/ folder and train again") from None


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


def discriminative_lrs(lr: float, n_groups: int, lr_mult: float = 100.0) -> list[float]:
    """Peak rates spaced geometrically from lr / lr_mult (first group) to lr (the head)."""
    if n_groups == 1:
        return [lr]
    return [lr / lr_mult ** (1 - i / (n_groups - 1)) for i in range(n_groups)]


def make_trainer(epochs: int, precision: str, callbacks: list, cfg, root: Path | None,
                 devices="auto", **kwargs) -> L.Trainer:
    """A quiet Lightning Trainer with imgclf's defaults."""
    extra = dict(cfg.extra or {})
    return L.Trainer(
        max_epochs=epochs,
        accelerator=extra.get("accelerator", getattr(cfg, "accelerator", "auto")),
        devices=extra.get("devices", getattr(cfg, "devices", devices)),
        num_nodes=int(extra.get("num_nodes", getattr(cfg, "num_nodes", 1))),
        strategy=extra.get("strategy", getattr(cfg, "strategy", "auto")),
        precision=precision,
        callbacks=callbacks,
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=bool(cfg.deterministic),
        default_root_dir=str(root) if root else _scratch_dir(),
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


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


UNFROZEN_MAX_LR = 1e-3


def batch_mixer(cfg, task: Task):
    """The mixup/CutMix batch transform a config asks for, or None.

    Label smoothing is left to the loss (cross-entropy smooths soft targets the same way), so
    it applies alike to mixed batches and to the unmixed ones after `mixup_off_epoch`.
    """
    from imgclf.augment import MixBatch

    mixup, cutmix = float(getattr(cfg, "mixup", 0) or 0), float(getattr(cfg, "cutmix", 0) or 0)
    if mixup <= 0 and cutmix <= 0:
        return None
    return MixBatch(num_classes=len(task.classes), multi_label=task.multi_label, mixup=mixup,
                    cutmix=cutmix, off_epoch=getattr(cfg, "mixup_off_epoch", None),
                    seed=cfg.seed)


def augment_on_device(cfg) -> bool:
    """Whether training crops and flips run batched on the device ("device") rather than per
    image in the loader ("loader"); "auto" picks the device when training runs on CUDA."""
    where = getattr(cfg, "augment_on", "auto") or "auto"
    if where == "auto":
        return torch.cuda.is_available() and getattr(cfg, "accelerator", "auto") in (
            "auto", "gpu", "cuda")
    return where == "device"


def keep_presized(x: torch.Tensor) -> torch.Tensor:
    """The loader's transform when crops happen on the device: none."""
    return x


def load_module_weights(model: nn.Module, ckpt_path: Path) -> None:
    """The network's weights from a Lightning checkpoint of a `ClassifierModule` around it."""
    state = AtomicCheckpointIO().load_checkpoint(ckpt_path)["state_dict"]
    model.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})


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
    console=None,
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
        resume: State of an interrupted run: {"stage", "lr", "lr_find"}.
        console: rich Console for messages.
    """
    from imgclf import balance, recipe
    from imgclf.data.datasets import make_loader, with_transform
    from imgclf.data.transforms import resized_eval_transform, train_transform

    quiet_lightning()
    say = console.print if console is not None else print
    rows = rows if rows is not None else []
    best = best or Best()
    resume = resume or {}
    precision = resolve_precision(cfg.precision, model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).to(memory_format=torch.channels_last)
    ckpt_dir = Path(run_dir) / "checkpoints" if run_dir else None
    t_start = time.perf_counter()
    seen = 0
    interrupted = False
    lr_find_info = resume.get("lr_find")
    lr = resume.get("lr") if resume.get("lr") is not None else (
        None if cfg.lr == "auto" else float(cfg.lr))
    frozen = cfg.pretrained and cfg.freeze_epochs > 0
    bn_mode = batchnorm_mode(cfg)
    valid_loader = make_loader(data.valid, cfg.batch_size, train=False, workers=cfg.workers)
    weight = (balance.class_weights(data.y_train, len(task.classes))
              if data.balance in ("weights", "sampler") else None)

    # Under DDP every process runs this function; only global rank 0 caches features, runs the
    # LR finder, trains the frozen head and writes state (see imgclf.distributed).
    rank_zero = distributed.is_rank_zero(int(getattr(cfg, "num_nodes", 1)))

    def save_state(stage: str, size_stage: int = 0) -> None:
        if ckpt_dir and rank_zero:
            atomic_write_json(ckpt_dir / "state.json",
                              {"stage": stage, "lr": lr, "lr_find": lr_find_info,
                               "size_stage": size_stage})

    if frozen and resume.get("stage") not in ("unfrozen", "done") and rank_zero:
        # The frozen stage has no checkpoint of its own: after a kill it runs again from the
        # start (its rows too), which gives the same head since it is seeded throughout.
        rows.clear()
        models.set_body_trainable(model, False)
        head = models.classifier(model)
        views = max(1, cfg.freeze_epochs)
        if bn_mode == "adapt":
            adapt_batchnorm(model, make_loader(data.train, cfg.batch_size, train=True,
                                               workers=cfg.workers, seed=cfg.seed + 1),
                            pre, device)
        train_plain = make_loader(data.train, cfg.batch_size, train=False, workers=cfg.workers)
        feats, ys = [], []
        for v in range(views):
            f, y = extract_features(model, train_plain, pre, precision, device,
                                    desc=f"Caching body features (view {v + 1}/{views})")
            feats.append(f)
            ys.append(y)
        f_valid, y_valid = extract_features(model, valid_loader, pre, "32-true", device,
                                            desc="Caching validation features")
        seen += views * len(data.train) + len(data.valid)
        head.to("cpu")  # next to its cached features: a linear layer needs no accelerator
        if lr is None:
            lr, lrs_curve, loss_curve = lr_range_test(
                head, task, torch.cat(feats), torch.cat(ys), cfg.batch_size, cfg.seed)
            lr_find_info = {"lrs": lrs_curve.tolist(), "losses": loss_curve.tolist(),
                            "suggestion": lr, "rule": "valley", "on": "frozen-body features"}
            say(f"Learning-rate finder (valley rule on cached features): lr = {lr:.2e}")
        n = len(data.train)
        # ViewSampler walks the cached augmented views epoch by epoch; weighting the loss gives
        # balanced sampling's expected gradient without breaking that walk, so both modes use it.
        interrupted = train_head(
            head, task, TensorDataset(torch.cat(feats), torch.cat(ys)), (f_valid, y_valid),
            cfg.freeze_epochs, lr, ViewSampler(n, views, cfg.seed, head_passes(n, cfg.batch_size)),
            cfg.batch_size, rows, best, model, on_row, class_weight=weight)
        if ckpt_dir and not interrupted and rank_zero:
            # The unfrozen stage starts from this head and these BatchNorm statistics; keep
            # them until its first checkpoint.
            save_tensors(ckpt_dir / HEAD_FILE, start_state(model))
            save_state("unfrozen")
        model.to(device)
    elif frozen and ckpt_dir and (ckpt_dir / HEAD_FILE).is_file():
        load_start_state(model, load_tensors(ckpt_dir / HEAD_FILE))
    if (not frozen and bn_mode == "adapt" and rank_zero
            and not (ckpt_dir and (ckpt_dir / "last.ckpt").is_file())):
        adapt_batchnorm(model, make_loader(data.train, cfg.batch_size, train=True,
                                           workers=cfg.workers, seed=cfg.seed + 1), pre, device)

    if lr is None:
        lr = 3e-3 if not cfg.pretrained else 1e-3
        lr_find_info = None
        say(f"lr = {lr:.1e} (default for {'random init' if not cfg.pretrained else 'fine-tuning'})")

    stages = recipe.size_schedule(getattr(cfg, "sizes", None), cfg.epochs,
                                  getattr(cfg, "stage_epochs", None), pre.size)
    if not interrupted and cfg.epochs > 0 and resume.get("stage") != "done":
        models.set_body_trainable(model, True)
        # Feature caching left the body in eval mode, and Lightning keeps submodules' modes: the
        # whole network must train here (batch norm, dropout), as it does after a resume.
        model.train()
        groups = models.layer_groups(model, 3)
        base = lr / 2 if frozen else lr
        if frozen and cfg.lr == "auto":
            # The finder measured what the new head on fixed features tolerates, typically
            # 3e-3 to 1e-2; the pretrained body needs fastai's fine-tuning rate (its default
            # 2e-3 halved), or its first unfrozen epochs undo what it knew.
            base = min(base, UNFROZEN_MAX_LR)
        lrs = discriminative_lrs(base, len(groups)) if cfg.pretrained else [base] * len(groups)
        mixer = batch_mixer(cfg, task)
        on_device = augment_on_device(cfg)
        sampler = (balance.balanced_sampler(data.y_train, len(task.classes), cfg.seed)
                   if data.balance == "sampler" else None)
        first = int(resume.get("size_stage", 0)) if resume.get("stage") == "unfrozen" else 0
        epoch_offset = (cfg.freeze_epochs if frozen else 0) + sum(
            st.epochs for st in stages[:first])
        if len(stages) > 1:
            say("Progressive resizing: " + ", then ".join(
                f"{st.epochs} epoch{'s' if st.epochs != 1 else ''} at {st.size}px"
                for st in stages) + " (the best epoch is chosen among the last stage's)")
        for k in range(first, len(stages)):
            st = stages[k]
            name = "unfrozen" if len(stages) == 1 else f"unfrozen-{st.size}px"
            train_ds, valid_ds = data.train, data.valid
            if st.size != pre.size:
                train_ds = with_transform(data.train, train_transform(st.size))
                valid_ds = with_transform(data.valid, resized_eval_transform(
                    st.size, pre.presize, pre.size / pre.presize))
            crop = None
            if on_device:
                # The loader hands over whole presized squares; crops happen on the device.
                train_ds = with_transform(data.train, keep_presized)
                crop = BatchCrop(st.size, seed=cfg.seed)
            cycle = None
            if getattr(cfg, "stage_schedule", "continue") == "continue" and len(stages) > 1:
                # One one-cycle across the stages: each size takes over at the rate the last
                # ended with. From scratch, restarted warm-ups coincided with drops of 5-9
                # points at each boundary that the stage then spent its epochs recovering.
                cycle = (sum(x.epochs for x in stages[:k]), sum(x.epochs for x in stages))
                stage_lrs, pct, div = list(lrs), (0.3 if frozen else 0.25), (5.0 if frozen else 25.0)
            else:
                # Each stage is a one-cycle of its own. Later stages refine what the first
                # learned (as fastai's fine_tune at the larger size after fit_one_cycle at the
                # small one): their peak falls as 1/(k+1), and they warm up briefly from a
                # fifth of it.
                stage_lrs = [r / (k + 1) for r in lrs]
                pct = (0.3 if frozen else 0.25) if k == 0 else 0.2
                div = 5.0 if frozen or k > 0 else 25.0
            module = ClassifierModule(model, task, groups, stage_lrs,
                                      pct_start=pct, div=div, preprocess=pre,
                                      class_weight=weight if data.balance == "weights" else None,
                                      batch_transform=mixer, epoch_offset=epoch_offset,
                                      stage_index=k, device_augment=crop, cycle=cycle,
                                      exact_validation=k == len(stages) - 1,
                                      freeze_bn=bn_mode != "train")
            # Order and augmentation are functions of (seed, epoch, position), so a resumed run
            # sees exactly the batches the uninterrupted one would have (see imgclf.resume).
            order = ResumableSampler(len(train_ds), cfg.seed + 7919 * k, inner=sampler)
            train_loader = make_loader(SeededDataset(train_ds), cfg.batch_size, train=True,
                                       workers=cfg.workers, seed=cfg.seed, sampler=order)
            progress = ResumeState(order, cfg.seed + 7919 * k, cfg.batch_size)
            callbacks: list = [progress, History(rows, best, name, model, task.monitor, on_row,
                                                 progress=progress,
                                                 eligible=k == len(stages) - 1)]
            ckpt_name = "last" if k == 0 else f"last-stage{k}"
            if ckpt_dir:
                from lightning.pytorch.callbacks import ModelCheckpoint

                callbacks.append(ModelCheckpoint(
                    dirpath=str(ckpt_dir), filename=ckpt_name, save_last=False, save_top_k=-1,
                    every_n_epochs=1, save_on_train_epoch_end=True,
                    enable_version_counter=False))
                if cfg.checkpoint_every:
                    callbacks.append(StepCheckpoint(
                        dirpath=str(ckpt_dir), filename=ckpt_name, save_top_k=-1,
                        every_n_train_steps=int(cfg.checkpoint_every),
                        enable_version_counter=False))
            trainer = make_trainer(st.epochs, precision, callbacks, cfg, run_dir)
            indexed_valid_loader = make_loader(distributed.IndexedDataset(valid_ds),
                                               cfg.batch_size, train=False, workers=cfg.workers)
            ckpt = None
            if ckpt_dir and resume.get("stage") == "unfrozen" and k == first:
                ckpt = ckpt_dir / f"{ckpt_name}.ckpt"
                previous = ckpt_dir / ("last.ckpt" if k == 1 else f"last-stage{k - 1}.ckpt")
                if not ckpt.is_file() and k > 0 and previous.is_file():
                    # Killed between stages: start this stage from the last one's weights.
                    load_module_weights(model, previous)
            save_state("unfrozen", k)
            with warnings.catch_warnings():
                # Lightning cannot see that ResumableSampler continues mid-epoch; it can.
                warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")
                fit_interruptible(trainer, module, train_loader, indexed_valid_loader,
                                  ckpt_path=str(ckpt) if ckpt and ckpt.is_file() else None,
                                  weights_only=True)
            interrupted = trainer.interrupted
            seen += st.epochs * (len(data.train) + len(data.valid))
            epoch_offset += st.epochs
            if interrupted:
                break
        if not interrupted:
            save_state("done")

    if best.state is not None:
        model.load_state_dict(best.state)
    models.set_body_trainable(model, True)
    model.eval()
    return FitResult(rows=rows, best=best, lr=float(lr), lr_find=lr_find_info,
                     precision=precision, interrupted=interrupted, train_images_seen=seen,
                     train_seconds=time.perf_counter() - t_start)
