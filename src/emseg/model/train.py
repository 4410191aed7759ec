"""One training run: build, initialise, fit with early stopping, return the best network and history.

Shared by the `tune` stage (short trials) and the `train` stage (the real run). Behaviour is added
with callbacks (history, pruning, checkpoints), not by editing the loop.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from emseg.config import Params
from emseg.model.bn import PreciseBatchNorm
from emseg.data.datamodule import ArraySplits, EMDataModule
from emseg.data.patches import slices_per_input
from emseg.data.prepare import load_split
from emseg.errors import ConfigError
from emseg.model.module import SegmentationModule
from emseg.model.network import SegmentationNet, channels_last, initialise, model_spec
from emseg.model.schedule import BudgetCosine

CURVE_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc", "train_iou", "val_iou", "train_consistency")


def curve_columns(history: list[dict]) -> list[str]:
    """history.csv's columns: the epoch and the curves this run has (train_consistency only with train.semi)."""
    return ["epoch", *(k for k in CURVE_KEYS if k != "train_consistency" or any(k in row for row in history))]


class History(Callback):
    """Per-epoch train/val loss, accuracy and IoU, handed to ``on_epoch`` (MLflow, CSV...) as they come."""

    def __init__(self, on_epoch=None):
        self.rows: list[dict] = []
        self.on_epoch = on_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        # Callback hooks run before the module's own on_train_epoch_end: log the train scores now.
        pl_module.log_epoch_scores("train")
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, **{k: float(m[k]) for k in CURVE_KEYS if k in m}}
        self.rows.append(row)
        if self.on_epoch:
            self.on_epoch(row)

    # Kept in Lightning checkpoints, so a resumed run has its whole history (and re-reports it).
    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
        for row in self.rows:
            if self.on_epoch:
                self.on_epoch(row)


@dataclass
class FitResult:
    net: SegmentationNet | None  # None on DDP ranks other than 0
    best_score: float
    history: list[dict]
    best_checkpoint: str | None
    init: str
    epochs: int
    seconds: float
    extra: dict = field(default_factory=dict)


def quiet() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    # DevicePatchStream is an IterableDataset with a length, always read by the main process (no workers).
    warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


class FreezeEncoder(Callback):
    """Keep the (pretrained) encoder fixed for the first ``epochs`` epochs, then train it too: the new
    decoder settles before it can pull the encoder's features away."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):
        frozen = trainer.current_epoch < self.epochs
        encoder = pl_module.net.net.encoder
        for p in encoder.parameters():
            p.requires_grad_(not frozen)
        # Frozen: BatchNorm statistics stay the pretrained ones as well. Unfrozen: back to train mode
        # explicitly, since Lightning restores each submodule's own mode after validation, which would
        # otherwise leave the encoder in eval mode (its BatchNorm never adapting to the target) for good.
        encoder.train(not frozen)


def ddp_worker() -> bool:
    """Whether this process is a DDP rank other than 0: one that Lightning started by running the command
    again (train.strategy: ddp; it sets LOCAL_RANK), or that torchrun or SLURM started (RANK, SLURM_PROCID).
    The variables are read in Lightning's own order."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key):
            return int(os.environ[key]) > 0
    return False


def _check_z_context(data, k: int) -> None:
    """The training inputs hold as many slices each as the network takes (model.z_context)."""
    if isinstance(data, ArraySplits):
        x, where = data.train[0], "the training arrays"
    else:
        x, where = load_split(Path(data), "train")[0], str(Path(data) / "train_images.npy")
    got = slices_per_input(x)
    if got != k:
        raise ConfigError(f"{where}: holds {got} slice(s) per input but model.z_context is {k}; prepare the data "
                          "again (emseg prepare, or dvc repro)")


def fit(params: Params, data, work_dir: str | Path, *, lr: float, batch_size: int,
        max_epochs: int | None = None, max_minutes: float | None = None, callbacks=(), on_epoch=None,
        progress: bool = True, checkpoints: bool = True, resume: bool = False,
        start_from: SegmentationNet | None = None, distributed: bool = False) -> FitResult:
    """Fit and return the best network. ``data``: a prepared folder or an ``ArraySplits``.
    ``start_from``: continue from these weights instead of ``train.init`` (active-learning rounds).
    With ``resume`` and a ``last.ckpt`` left in ``work_dir`` by an interrupted run of the same
    configuration, training continues from it (epoch, optimiser, schedule, early-stopping and time
    budget included) instead of starting again.
    ``distributed``: use ``train.devices`` and ``train.strategy`` (the train stage); otherwise one device
    (tuning, learning curves, active learning). Under DDP every rank returns; only rank 0's result
    holds the network (``net`` is None on the others, which must write nothing)."""
    quiet()
    cfg = params.train
    L.seed_everything(params.seed, workers=True, verbose=False)
    module = SegmentationModule(model_spec(params.model), lr=lr, weight_decay=cfg.weight_decay,
                                loss=cfg.loss.model_dump(), threshold=cfg.threshold,
                                encoder_lr_factor=cfg.encoder_lr_factor, semi=cfg.semi.model_dump())
    if start_from is not None:
        module.net.load_state_dict(start_from.state_dict())
        init_desc = "previous round"
    else:
        init_desc = initialise(module.net, cfg.init)
    _check_z_context(data, params.model.z_context)
    dm = EMDataModule(data, cfg, batch_size, params.seed)
    history = History(on_epoch)
    # PreciseBatchNorm first: validation, checkpoints and pruning must all see the recalibrated network.
    cbs = [PreciseBatchNorm(), history, EarlyStopping("val_iou", mode="max", patience=cfg.early_stopping_patience),
           *callbacks]
    if cfg.freeze_encoder_epochs:
        cbs.insert(0, FreezeEncoder(cfg.freeze_encoder_epochs))
    ckpt = None
    if checkpoints:
        ckpt = ModelCheckpoint(dirpath=Path(work_dir) / "checkpoints", filename="best", monitor="val_iou",
                               mode="max", save_last=True, enable_version_counter=False)
        cbs.append(ckpt)
    gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    devices, strategy = (cfg.devices, cfg.strategy) if distributed else (1, "auto")
    if strategy == "auto" and devices != 1:  # several devices: always the DDP this module handles
        strategy = "ddp"
    if strategy not in ("auto", "ddp"):
        raise ConfigError(f"params.yaml: train.strategy: {strategy!r}; expected auto or ddp (one process per "
                          "device, started by the train stage)")
    ddp = strategy == "ddp"
    if ddp:
        # smp's EfficientNet keeps a head the U-Net never calls, and train.freeze_encoder_epochs leaves
        # the encoder without gradients at first: DDP must expect parameters that get none.
        strategy = "ddp_find_unused_parameters_true"
    max_time, budget = None, None
    minutes = max_minutes if max_minutes is not None else cfg.max_minutes
    if minutes:
        max_time = timedelta(seconds=minutes * 60)
        budget = BudgetCosine(minutes * 60)
        cbs.append(budget)
    trainer = L.Trainer(
        max_epochs=max_epochs or cfg.max_epochs, max_time=max_time, accelerator=cfg.accelerator,
        devices=devices, strategy=strategy, precision=cfg.precision or ("16-mixed" if gpu else "32-true"),
        # DDP on GPUs: BatchNorm over the patches of all ranks (the batch one process would see; torch
        # has no CPU SyncBatchNorm). The data module splits patches and validation slices between ranks.
        sync_batchnorm=ddp and gpu, use_distributed_sampler=False,
        callbacks=cbs, logger=False, enable_checkpointing=checkpoints, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=False,
        default_root_dir=str(work_dir), log_every_n_steps=1,
    )
    last = Path(work_dir) / "checkpoints" / "last.ckpt"
    resumed_from = None
    if resume and checkpoints and last.is_file():
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
        print(f"train: resuming from {last} (interrupted after epoch {resumed_from})")
    t0 = time.time()
    with channels_last(module.net, cfg.channels_last):
        module.start_teacher()  # train.semi: the mean teacher starts from the same weights, in the same layout
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resumed_from is not None else None,
                    weights_only=True)
    seconds = time.time() - t0
    best = max((r.get("val_iou", 0.0) for r in history.rows), default=0.0)
    if trainer.global_rank != 0:
        return FitResult(None, best, history.rows, None, init_desc, len(history.rows), seconds,
                         {"rank": trainer.global_rank})
    if ckpt is not None and ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    net = module.net.cpu().eval()
    if ddp and gpu:  # back from SyncBatchNorm to the plain network every reader of models/ expects
        plain = SegmentationNet(model_spec(params.model))
        plain.load_state_dict(net.state_dict())
        net = plain.eval()
    return FitResult(net, best, history.rows, ckpt.best_model_path if ckpt else None, init_desc,
                     len(history.rows), seconds, {"resumed_from_epoch": resumed_from,
                                                  "schedule_progress": round(budget.progress, 3) if budget else None})
