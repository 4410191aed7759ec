"""Typed, validated view of params.yaml.

params.yaml is the single source of truth: DVC reads it to decide what to rerun, and every stage
reads it through :func:`load_params`. Unknown keys and wrong types are refused with one line that
names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from emseg.errors import ConfigError
from emseg.paths import ANNOTATIONS_DIR, OPTUNA_DIR, PARAMS

PositiveInt = Annotated[int, Field(gt=0)]
SliceSpec = Union[PositiveInt, list[Annotated[int, Field(ge=0)]]]


LABEL_VALUES = (0, 1, 255)  # background 0, foreground 255 (or 1): an ignore value must be none of them


def _not_a_label_value(v: int) -> int:
    if v in LABEL_VALUES:
        raise ValueError(f"{v} is a label value (0 background, 255 or 1 foreground); choose another, for example 128")
    return v


IgnoreValue = Annotated[int, Field(ge=0, le=65535), AfterValidator(_not_a_label_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, protected_namespaces=())


class GeneratedSource(_Strict):
    """The built-in EM-like generator: the default that runs with no download."""

    slices: PositiveInt = 32  # room for 12 training and 3 validation slices min_gap apart
    test_slices: PositiveInt = 4
    height: Annotated[int, Field(ge=64)] = 768
    width: Annotated[int, Field(ge=64)] = 1024
    seed: int = 0


class TiffSource(_Strict):
    """A user's own stacks: multi-page TIFF files or folders of 2D TIFF/PNG slices."""

    image: str
    labels: str
    test_image: Optional[str] = None
    test_labels: Optional[str] = None


class EpflSource(_Strict):
    """The EPFL hippocampus files, fetched from the first mirror that has them."""

    mirrors: list[str]
    cache_dir: str = "~/.cache/emseg/epfl"
    sha256: dict[str, Optional[str]] = {}
    timeout_s: Annotated[float, Field(gt=0)] = 30.0


class DataParams(_Strict):
    source: Literal["generated", "tiff", "epfl"] = "generated"
    train_slices: SliceSpec = 12
    val_slices: SliceSpec = 3
    # Smallest z-distance between slices of different splits (train, val, test) of one stack: 1 allows
    # neighbours, 2 (the default) leaves at least one slice between them.
    min_gap: PositiveInt = 2
    # Only for sources without a separate test stack: slices held out of the training stack.
    test_slices: Optional[SliceSpec] = None
    # Label value that means "not annotated" (partially labelled slices); None: every pixel labelled.
    ignore_value: Optional[IgnoreValue] = None
    generated: GeneratedSource = GeneratedSource()
    # Folder of `emseg suggest` outputs; painted templates found under it join the training data.
    annotations: Optional[str] = ANNOTATIONS_DIR
    # Slices of the training stack kept without their labels for semi-supervised training (train.semi):
    # spread evenly over the slices that are not training slices and lie at least data.min_gap from
    # every validation and test slice. 0: none.
    unlabelled_slices: Annotated[int, Field(ge=0)] = 0
    tiff: Optional[TiffSource] = None
    epfl: Optional[EpflSource] = None


PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ModelParams(_Strict):
    arch: Literal["Unet", "UnetPlusPlus", "FPN", "Linknet", "MAnet", "DeepLabV3Plus"] = "Unet"
    encoder: str = "efficientnet-b0"
    decoder_channels: list[PositiveInt] = [256, 128, 64, 32, 16]
    # smp's efficientnet-b* keep BatchNorm momentum 0.01 (TF's 0.99): after a short training the
    # running statistics lag far behind and eval-mode predictions collapse. 0.1 is PyTorch's default.
    bn_momentum: Optional[Annotated[float, Field(gt=0, le=1)]] = 0.1
    dropout: Probability = 0.0  # dropout before the segmentation head (MC dropout for active learning)
    # The network sees the image resampled by this factor (0.5: half resolution, 4x fewer pixels, twice
    # the field of view per pixel) and returns logits at the input's own size. Part of the saved
    # model, so evaluation, `emseg predict` and MLflow serving all apply it; patches stay in input pixels.
    input_scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    # 2.5D: each slice is fed with its (z_context - 1) / 2 neighbours above and below as extra input
    # channels (odd; 1 = plain 2D). Only the centre slice needs labels; the ends of a stack are
    # mirrored. Part of the saved model, so prediction reads the same neighbours.
    z_context: Annotated[int, Field(ge=1, le=15)] = 1


class InitParams(_Strict):
    """Where the starting weights come from (transfer learning)."""

    mode: Literal["scratch", "checkpoint", "registry", "imagenet"] = "scratch"
    path: Optional[str] = None  # checkpoint: a .ckpt/.pt file; imagenet: a local encoder weights file
    uri: Optional[str] = None  # registry: models:/NAME@ALIAS or models:/NAME/VERSION


class AugmentParams(_Strict):
    """Probabilities of each augmentation, applied to image and mask together (0 disables)."""

    flip: Probability = 0.5
    rotate90: Probability = 0.5
    elastic: Probability = 0.25
    brightness_contrast: Probability = 0.5
    gamma: Probability = 0.25
    noise: Probability = 0.25
    blur: Probability = 0.15


class LossParams(_Strict):
    focal_weight: Annotated[float, Field(ge=0)] = 1.0
    dice_weight: Annotated[float, Field(ge=0)] = 1.0
    gamma: Annotated[float, Field(ge=0)] = 2.0
    alpha: Optional[Probability] = None


class SemiParams(_Strict):
    """Mean teacher (Tarvainen and Valpola, 2017): every batch of labelled patches is joined by as many
    patches of the unlabelled slices (data.unlabelled_slices); the network, given a perturbed copy of
    each, is pulled towards what its moving average (the teacher) predicts for the clean one. The pull
    acts on unlabelled pixels only; ``weight`` 0 turns it off and training is as without it."""

    weight: Annotated[float, Field(ge=0)] = 0.0  # of the consistency loss, beside the supervised loss
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.99  # the teacher's moving-average decay per step
    rampup_epochs: Annotated[int, Field(ge=0)] = 5  # the weight rises to its value over these epochs
    noise: Annotated[float, Field(ge=0)] = 0.1  # sd of the Gaussian noise on the student's copy (z units)
    confidence: Annotated[float, Field(ge=0.5, le=1)] = 0.5  # teacher pixels less sure than this do not pull


class TrainParams(_Strict):
    patch_size: Annotated[int, Field(ge=32, multiple_of=32)] = 256
    patches_per_epoch: PositiveInt = 64
    foreground_bias: Probability = 0.5  # share of patches centred on an annotated foreground pixel
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    max_epochs: PositiveInt = 20
    # A budget: training stops when it runs out, and the cosine schedule anneals by whichever ends
    # first, these minutes or max_epochs (emseg.model.schedule), so a slower machine still anneals.
    max_minutes: Optional[PositiveFloat] = None
    early_stopping_patience: PositiveInt = 8
    use_tuned: bool = True  # take lr and batch_size from the tune stage's best_params.json
    num_workers: Annotated[int, Field(ge=0)] = 0
    accelerator: str = "auto"
    devices: Union[PositiveInt, Literal["auto"]] = 1  # >1 with strategy ddp: one process per device (train stage)
    strategy: Literal["auto", "ddp"] = "auto"  # ddp: one process per device (train stage only)
    precision: Optional[str] = None  # None: 16-mixed on a GPU, 32 on the CPU
    channels_last: bool = True  # NHWC layout for the network's tensors: faster steps (benchmarks/bench_layout.py)
    # Cut and augment the training patches on the training device (emseg.data.device_patches) instead
    # of in CPU loader workers; auto: on when training on a GPU, off on the CPU.
    device_patches: Literal["auto", "on", "off"] = "auto"
    threshold: Probability = 0.5
    loss: LossParams = LossParams()
    augment: AugmentParams = AugmentParams()
    init: InitParams = InitParams()
    # Fine-tuning from pretrained weights: encoder frozen for the first epochs, then trained at lr * factor.
    freeze_encoder_epochs: Annotated[int, Field(ge=0)] = 0
    encoder_lr_factor: Annotated[float, Field(gt=0, le=1)] = 1.0
    semi: SemiParams = SemiParams()  # semi-supervised training on the unlabelled slices (off by default)

    def identity(self, **exclude) -> dict:
        """The settings that decide what a run trains, for hashing: a registry init is named by its
        resolved version (``init.uri``), not by the temporary file its weights were fetched to."""
        drop = {**exclude, **({"init": {"path"}} if self.init.mode == "registry" else {})}
        if self.semi.weight == 0:  # off: hashes stay those of runs from before semi-supervised training existed
            drop["semi"] = True
        return self.model_dump(exclude=drop)


class TuneParams(_Strict):
    n_trials: PositiveInt = 4
    epochs_per_trial: PositiveInt = 3
    minutes_per_trial: Optional[PositiveFloat] = None
    timeout_minutes: Optional[PositiveFloat] = None
    lr_min: PositiveFloat = 1e-4
    lr_max: PositiveFloat = 1e-2
    batch_sizes: list[PositiveInt] = [4, 8]
    pruning: bool = True
    # MedianPruner: a trial may be stopped after this many epochs, once this many trials have completed.
    prune_after_epochs: PositiveInt = 1
    prune_startup_trials: Annotated[int, Field(ge=0)] = 2
    storage: str = f"sqlite:///{OPTUNA_DIR}/study.db"  # any SQLAlchemy URL
    study_name: str = "emseg"
    heartbeat_s: Optional[PositiveInt] = 60


class InstanceParams(_Strict):
    min_size: Annotated[int, Field(ge=0)] = 30  # objects of fewer pixels are dropped
    h: PositiveFloat = 2.0  # h-maxima depth (pixels of distance) that makes a separate seed
    # If given, `emseg evaluate` picks h among these by instance F1 on the validation slices (never on
    # the test slices) and uses it on the test stack; `register` tags the model version with it and
    # `emseg predict` takes it from there. Empty: h as set above.
    h_choices: list[PositiveFloat] = [1.0, 2.0, 4.0, 6.0, 8.0]
    smooth: Annotated[float, Field(ge=0)] = 1.0
    # The true objects of a label stack without object labels: "3d", the connected components through
    # each run of consecutive test slices (isotropic stacks such as FIB-SEM; predicted objects are split
    # in 3D too), or "2d", per slice (anisotropic serial sections). Object labels the source provides
    # (the generator's) are used as they are. metrics.json names the truth used. "3d" splits each run of
    # consecutive test slices as one volume (of the order of 150 bytes a voxel at peak): for test blocks
    # of several GB use "2d".
    truth: Literal["3d", "2d"] = "3d"


class InferenceParams(_Strict):
    tile: Annotated[int, Field(ge=64, multiple_of=32)] = 1024  # a slice that fits is predicted in one piece
    overlap: Annotated[int, Field(ge=0)] = 128
    batch_size: PositiveInt = 1
    tta: bool = False  # average over flips (4x slower)
    channels_last: bool = True  # NHWC layout: 1.5x faster on a CPU (benchmarks/bench_layout.py)


class EvaluateParams(_Strict):
    inference: InferenceParams = InferenceParams()
    instances: InstanceParams = InstanceParams()
    overlays: Annotated[int, Field(ge=0)] = 3
    # true: `emseg evaluate` scores the validation slices with and without flip TTA and keeps TTA only
    # where it gives the higher foreground IoU there (never decided on the test slices).
    choose_tta: bool = False
    # Average each slice's probability with its z neighbours' (weights 1/4, 1/2, 1/4) before the threshold:
    # for near-isotropic stacks, where a neighbouring slice shows nearly the same objects.
    z_average: bool = False
    # true: `emseg evaluate` scores the validation slices with and without z-averaging (prepare keeps their
    # neighbours) and keeps it only where it gives the higher foreground IoU there.
    choose_z_average: bool = False


class RegisterParams(_Strict):
    """Promotion: the challenger must beat the champion on this run's validation slices by more than this."""

    min_gain: Annotated[float, Field(ge=0, le=1)] = 0.0


class TrackingParams(_Strict):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "emseg"
    registered_model: str = "emseg-unet"


StrategyName = Literal["random", "entropy", "least_confidence", "bald", "kmeans", "coreset", "hybrid"]


class ActiveParams(_Strict):
    """Active learning: the simulation (pipelines/active_learning) and `emseg suggest`."""

    # Simulation data: epfl (data.epfl mirrors), generated, or auto (epfl when its first mirror is a
    # local folder that exists, generated otherwise).
    source: Literal["auto", "epfl", "generated"] = "auto"
    downsample: Annotated[int, Field(ge=1, le=8)] = 2  # simulation runs on slices binned by this factor
    pool_slices: Annotated[int, Field(ge=1)] = 12  # training-stack slices the pool is cut from (evenly spaced)
    val_slices: Annotated[int, Field(ge=1)] = 2
    test_slices: Optional[PositiveInt] = 8  # evenly spaced test slices scored each round; null: all
    patch_size: Annotated[int, Field(ge=32, multiple_of=32)] = 128  # the unit a person labels
    stride: Optional[PositiveInt] = None  # grid step of candidate patches; null: half a patch
    initial: PositiveInt = 4  # random patches labelled before the first query
    query: PositiveInt = 4  # patches queried per round
    rounds: PositiveInt = 3
    strategies: list[StrategyName] = ["random", "entropy", "least_confidence", "bald", "kmeans", "coreset", "hybrid"]
    seeds: list[int] = [0, 1, 2]
    mc_passes: Annotated[int, Field(ge=2)] = 8  # Monte Carlo dropout passes for BALD
    dropout: Annotated[float, Field(gt=0, lt=1)] = 0.2  # model.dropout while active learning (BALD needs it)
    hybrid_base: Literal["entropy", "least_confidence", "bald"] = "entropy"
    shortlist_factor: PositiveInt = 4  # hybrid: k-centre among the (factor x query) most uncertain
    max_overlap: Probability = 0.25  # picks overlapping more than this share of a patch are near-duplicates...
    z_gap: Annotated[int, Field(ge=0)] = 1  # ...when they are at most this many slices apart
    label_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0  # share of a queried patch the oracle labels
    epochs_first: PositiveInt = 8
    epochs_round: PositiveInt = 3
    patches_per_epoch: PositiveInt = 32
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.002


class PretrainSource(_Strict):
    """One source dataset for pretraining: a labelled TIFF stack (or folder of slices)."""

    name: str
    image: str
    labels: str
    scale: Annotated[float, Field(gt=0, le=4)] = 1.0  # resample so pixel sizes match the target's
    invert: bool = False  # swap foreground and background (ISBI 2012 labels cell interior 255)
    ignore_value: Optional[IgnoreValue] = None
    val_slices: PositiveInt = 2


class PretrainParams(_Strict):
    sources: list[PretrainSource] = [PretrainSource(
        name="vnc-mitochondria", image="../shared/data/drosophila-vnc/stack1_raw.tif",
        labels="../shared/data/drosophila-vnc/stack1_mitochondria.tif", scale=0.5)]
    patch_size: Annotated[int, Field(ge=32, multiple_of=32)] = 128
    patches_per_epoch: PositiveInt = 96  # split evenly between the sources (balanced sampling)
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.002
    max_epochs: PositiveInt = 25
    max_minutes: Optional[PositiveFloat] = None
    registered_model: str = "emseg-pretrained"
    alias: str = "pretrained"


class SslStack(_Strict):
    """Another unlabelled EM stack for self-supervised pretraining: every slice, z-scored by its own statistics."""

    name: str
    image: str
    scale: Annotated[float, Field(gt=0, le=4)] = 1.0  # resample so pixel sizes match the project's stack


class SslParams(_Strict):
    """Self-supervised pretraining (`dvc repro pipelines/ssl/dvc.yaml`): the whole U-Net learns to restore
    patches of the project's own stack (every slice at least data.min_gap from a validation or test
    slice) and of ``stacks``, with blocks masked out and noise added; registered as @ssl for train.init."""

    stacks: list[SslStack] = []  # further unlabelled stacks beside the project's own
    scale: Annotated[float, Field(gt=0, le=4)] = 1.0  # the project's own stack (1: as training sees it)
    max_slices: Optional[PositiveInt] = None  # per stack, spread evenly (null: all; a cap for memory)
    val_slices: PositiveInt = 2  # of the project's stack's eligible slices, kept for the validation loss
    patch_size: Annotated[int, Field(ge=32, multiple_of=32)] = 192
    patches_per_epoch: PositiveInt = 160
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.002
    max_epochs: PositiveInt = 40
    max_minutes: Optional[PositiveFloat] = 30.0
    holes: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = [8, 16]  # masked blocks per patch...
    hole_size: Annotated[list[Probability], Field(min_length=2, max_length=2)] = [0.06, 0.16]  # ...side / patch side
    noise: Annotated[float, Field(ge=0)] = 0.2  # sd of Gaussian noise on the whole input (z-score units)
    visible_weight: Annotated[float, Field(ge=0)] = 0.1  # loss on unmasked pixels (denoising), beside the masked
    registered_model: str = "emseg-ssl"
    alias: str = "ssl"


class LearningCurveParams(_Strict):
    source: Literal["auto", "epfl", "generated"] = "auto"  # as active.source
    scale: Annotated[float, Field(gt=0, le=1)] = 0.5  # the target's resampling (match pretrain sources)
    slice_counts: list[Union[PositiveInt, Literal["all"]]] = [1, 4, 12, "all"]
    # scratch; pretrained (pretrained_uri); ssl: self-supervised pretraining (params.yaml's ssl settings)
    # on the target's own pool, every slice data.min_gap from validation, once per run, no labels
    inits: list[Literal["scratch", "pretrained", "ssl"]] = ["scratch", "pretrained"]
    # every init is trained with each option: plain; z_context (2.5D input of z_context slices, the
    # stack's ends reflected); semi (mean teacher on the pool's unlabelled slices, settings ``semi``)
    options: list[Literal["plain", "z_context", "semi"]] = ["plain"]
    z_context: Annotated[int, Field(ge=3, le=15)] = 3  # option z_context (odd)
    semi: SemiParams = SemiParams(weight=1.0, rampup_epochs=4)  # option semi
    unlabelled_slices: PositiveInt = 48  # option semi: pool slices that are not labelled, spread evenly
    seeds: list[int] = [0, 1, 2]
    val_slices: PositiveInt = 2
    test_slices: Optional[PositiveInt] = 10  # evenly spaced test slices; null: all
    # each point: z-averaging (evaluate.z_average) on or off by its validation IoU; points.csv has both
    choose_z_average: bool = False
    patch_size: Annotated[int, Field(ge=32, multiple_of=32)] = 128
    patches_per_epoch: PositiveInt = 64
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.002
    max_epochs: PositiveInt = 60  # a cap only: each point stops when its validation IoU stops improving
    patience: PositiveInt = 5  # epochs without a better validation IoU that stop a point (early stopping)
    pretrained_uri: str = "models:/emseg-pretrained@pretrained"
    freeze_encoder_epochs: Annotated[int, Field(ge=0)] = 1  # fine-tuning: decoder first
    encoder_lr_factor: Annotated[float, Field(gt=0, le=1)] = 0.5


# pydantic warns that a field named `register` shadows the metaclass's ABC `register`; instances see
# the field (metaclass methods are not instance attributes), so the section keeps the name users type.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(_Strict):
        seed: int = 42
        data: DataParams = DataParams()
        model: ModelParams = ModelParams()
        train: TrainParams = TrainParams()
        tune: TuneParams = TuneParams()
        evaluate: EvaluateParams = EvaluateParams()
        register: RegisterParams = RegisterParams()
        tracking: TrackingParams = TrackingParams()
        active: ActiveParams = ActiveParams()
        pretrain: PretrainParams = PretrainParams()
        learning_curve: LearningCurveParams = LearningCurveParams()
        ssl: SslParams = SslParams()


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            parts.append(f"{key}: required key is missing")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            parts.append(f"{key}: {e['msg']} (got {got_s})")
    return f"{source}: " + "; ".join(parts)


def parse_params(raw: dict[str, Any], source: str = PARAMS) -> Params:
    """Validate an already-loaded mapping; raise ConfigError with one line naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    if params.model.z_context % 2 == 0:
        raise ConfigError(f"{source}: model.z_context: {params.model.z_context} is even; expected an odd count "
                          "(the slice itself and as many neighbours above as below), e.g. 1, 3 or 5")
    if params.data.min_gap <= params.model.z_context // 2:
        # A training input's neighbours would then include a validation or test slice's image.
        raise ConfigError(f"{source}: data.min_gap: {params.data.min_gap} is within the reach of model.z_context "
                          f"{params.model.z_context} (+-{params.model.z_context // 2} slices); expected at least "
                          f"{params.model.z_context // 2 + 1}, so no input sees another split's slices")
    lc = params.learning_curve
    if lc.z_context % 2 == 0:
        raise ConfigError(f"{source}: learning_curve.z_context: {lc.z_context} is even; expected an odd count, "
                          "e.g. 3 or 5")
    if "z_context" in lc.options and params.data.min_gap <= lc.z_context // 2:
        raise ConfigError(f"{source}: data.min_gap: {params.data.min_gap} is within the reach of "
                          f"learning_curve.z_context {lc.z_context}; expected at least {lc.z_context // 2 + 1}")
    for key in ("inits", "options"):
        values = getattr(lc, key)
        if not values or len(set(values)) < len(values):
            raise ConfigError(f"{source}: learning_curve.{key}: {values}: expected at least one entry, each once")
    if "plain" not in lc.options:
        raise ConfigError(f"{source}: learning_curve.options: {lc.options}: each option is measured against plain; "
                          "list plain too")
    if params.train.semi.weight > 0 and params.data.unlabelled_slices == 0:
        raise ConfigError(f"{source}: train.semi.weight: {params.train.semi.weight:g} needs unlabelled slices to "
                          "learn from; set data.unlabelled_slices (e.g. 24), or train.semi.weight: 0")
    scaled = params.train.patch_size * params.model.input_scale
    if scaled < 32:
        raise ConfigError(f"{source}: train.patch_size: {params.train.patch_size} px at model.input_scale "
                          f"{params.model.input_scale:g} leaves {scaled:g} px for the network; expected at least 32")
    return params


def require_2d(params: Params, what: str, source: str = PARAMS, why: str | None = None) -> Params:
    """``params``, unless they ask for 2.5D input (model.z_context > 1), which ``what`` cannot feed yet;
    ``why``: the error's own reason and remedy instead of the generic one."""
    if params.model.z_context > 1:
        why = why or f"{what} feeds single slices only so far; set model.z_context: 1 for it"
        raise ConfigError(f"{source}: model.z_context: {params.model.z_context}: {why}")
    return params


def derive(params: Params, changes: dict[str, Any], source: str) -> Params:
    """These params with ``changes`` (nested like params.yaml: ``{"train": {"lr": 1e-3}}``) merged in and
    validated again by the schema, cross-field checks included: the one way the further pipelines
    (pretraining, learning curves, active learning) derive their training settings. A misspelt key or
    a bad value fails with one line that starts with ``source``, the section the values came from."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            both = isinstance(value, dict) and isinstance(out.get(key), dict)
            out[key] = merge(out[key], value) if both else value
        return out

    return parse_params(merge(params.model_dump(), changes), source)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a params YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and b"\x00" in data[:2]):
        # What PowerShell's `>` writes. DVC reads params.yaml too, and only as UTF-8: convert rather than guess.
        raise ConfigError(f"{path}: is encoded as UTF-16; save it as UTF-8 (PowerShell: "
                          f"Get-Content {path.name} | Set-Content -Encoding utf8 {path.name})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return raw if raw is not None else {}


def _written_paths(params: Params) -> dict[str, str]:
    """The params that name places emseg writes to (relative ones are relative to the project)."""
    out = {"tracking.artifact_root": params.tracking.artifact_root}
    if params.data.epfl is not None:
        out["data.epfl.cache_dir"] = params.data.epfl.cache_dir
    for key, url in (("tune.storage", params.tune.storage), ("tracking.tracking_uri", params.tracking.tracking_uri)):
        if url.startswith("sqlite:///"):
            out[key] = url[len("sqlite:///"):]
    return out


def check_confined(params: Params, root: str | Path, source: str = PARAMS) -> None:
    """Relative paths that emseg writes to must stay inside the project; an absolute path (or ~) is
    taken as meant. Inputs (the user's stacks, mirrors, starting weights) are only read and may be anywhere."""
    root = Path(root).resolve()
    for key, value in _written_paths(params).items():
        p = Path(value)
        if p.is_absolute() or value.startswith("~"):
            continue
        if not (root / p).resolve().is_relative_to(root):
            raise ConfigError(f"{source}: {key}: {value!r} leads outside the project ({root}); "
                              f"give an absolute path if that is really where it should go")


def load_params(path: str | Path = PARAMS) -> Params:
    params = parse_params(read_yaml(path), str(path))
    check_confined(params, Path(path).parent, str(path))
    return params
