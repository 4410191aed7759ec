"""`emseg <command>`: a thin front to the stages. User errors print one line and exit 1."""

from __future__ import annotations

import argparse
import errno
import signal
import sys

from emseg.errors import ConfigError, EmsegError
from emseg.paths import PARAMS

DEFAULT_PARAMS = PARAMS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emseg", description="Few-label EM segmentation (DVC + MLflow + Optuna).")
    p.add_argument("--params", default=None, help=f"params file (default: {DEFAULT_PARAMS})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("fetch", help="materialise the raw stacks of data.source into data/raw")
    sub.add_parser("prepare", help="validate raw stacks, choose slices, write data/prepared")
    sub.add_parser("tune", help="Optuna study over learning rate and batch size (resumable)")
    sub.add_parser("train", help="train the network, track the run in MLflow")
    sub.add_parser("evaluate", help="choose post-processing on validation, score the test split once, "
                                    "write models/emseg.pt, log to its MLflow run")
    sub.add_parser("register", help="register models/emseg.pt; move alias champion only if it beats the "
                                    "champion on this run's validation slices")
    sub.add_parser("active-learning", help="simulate active-learning strategies (pipelines/active_learning)")
    sub.add_parser("pretrain", help="train on other EM datasets, register as @pretrained (pipelines/pretrain)")
    sub.add_parser("ssl", help="self-supervised pretraining on the unlabelled slices, register as @ssl "
                   "(pipelines/ssl)")
    sub.add_parser("learning-curve",
                   help="test IoU against labelled slices, scratch vs pretrained (pipelines/learning_curve)")
    pr = sub.add_parser("promote", help="point an alias of a registered model at a version")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", required=True)
    pd = sub.add_parser("predict", help="predict a TIFF stack or folder of slices with a trained model")
    pd.add_argument("input", help="multi-page TIFF or folder of 2D TIFF/PNG slices")
    pd.add_argument("output", help="new folder for the predicted stacks and summary.json")
    pd.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a weights .pt file")
    pd.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pd.add_argument("--tta", action="store_true", help="average over flips (slower, smoother)")
    pd.add_argument("--z-average", choices=("on", "off"), default=None, dest="z_average",
                    help="average each slice's probability with its z neighbours' (weights 1/4, 1/2, 1/4); "
                         "default: as chosen for the model on validation (evaluate.choose_z_average), else off")
    pd.add_argument("--format", choices=("tiff", "ome-zarr"), default=None, dest="fmt",
                    help="tiff (default for TIFF and folder inputs): probabilities.tif + instances.tif, in one "
                         "process; ome-zarr (default for Zarr and HDF5): blockwise on Dask into a multiscale "
                         "prediction.ome.zarr (OME-NGFF 0.4) with objects.csv; any size, resumable")
    big = pd.add_argument_group("large volumes (--format ome-zarr)")
    big.add_argument("--input-key", default=None, help="the array in a Zarr group or the dataset in an HDF5 file")
    big.add_argument("--level", type=int, default=0, help="multiscale level of an OME-Zarr input (default 0)")
    big.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                     help="voxel size in nm (default: from OME or TIFF metadata)")
    big.add_argument("--instances", choices=("2d", "3d"), default=None,
                     help="objects in 3D, or per slice for anisotropic serial sections (default: 3d when z is at "
                          "most twice y and x, 2d otherwise or when the voxel size is unknown)")
    big.add_argument("--block", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                     help="object block in voxels (y and x multiples of 512; default 16 512 512 for 3D objects, "
                          "4 2048 2048 for 2D ones, which slices up to 2048 px skip)")
    big.add_argument("--scheduler", default=None, help="tcp://HOST:PORT of a running Dask scheduler (default: a "
                     "local cluster sized to this machine)")
    big.add_argument("--workers", type=int, default=None, help="workers of the local cluster (default: one per "
                     "core, fewer if memory is short)")
    ex = sub.add_parser("export", help="write a model as a bioimage.io package (ilastik, deepImageJ, QuPath, "
                        "bioimageio.core)")
    ex.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a weights .pt file")
    ex.add_argument("output", help="new .zip file (or, without .zip, a new folder) for the package")
    ex.add_argument("--sample", default=None, help="TIFF stack or folder of slices to cut the package's test input "
                    "from (default: the project's data/raw/train_image.tif)")
    ex.add_argument("--slice", type=int, default=None, dest="z", help="slice of --sample (default: the middle one)")
    ex.add_argument("--author", default="emseg", help="author named in the package (default: emseg)")
    ex.add_argument("--license", default="MIT", help="SPDX licence of the weights (default: MIT)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing package emseg wrote")
    sg = sub.add_parser("suggest", help="the patches (or slices) of a stack to label next, with templates to paint")
    sg.add_argument("input", help="multi-page TIFF or folder of 2D TIFF/PNG slices")
    sg.add_argument("output", help="new folder (put it under annotations/ to train on it once painted)")
    sg.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a weights .pt file")
    # Unset flags take their values from the `active` section of params.yaml (or its schema defaults
    # outside a project), the settings the active-learning simulation measured.
    sg.add_argument("-k", type=int, default=None, help="how many to suggest (default: active.query)")
    sg.add_argument("--unit", choices=("patch", "slice"), default="patch")
    sg.add_argument("--patch-size", type=int, default=None,
                    help="patch side in native px (default: active.patch_size x active.downsample)")
    sg.add_argument("--strategy", default="entropy",
                    help="entropy (default), least_confidence, bald, hybrid, coreset, kmeans or random")
    sg.add_argument("--every", type=int, default=1, help="score every Nth slice (default: all)")
    sg.add_argument("--mc-passes", type=int, default=None,
                    help="Monte Carlo dropout passes for bald (default: active.mc_passes)")
    sg.add_argument("--blank", type=int, default=128, help="value of unpainted template pixels (default 128)")
    sg.add_argument("--overwrite", action="store_true", help="replace an existing folder whose templates are unpainted")
    return p


def _optional_params(args: argparse.Namespace):
    """predict and suggest run outside a project too: params.yaml if present; a --params that is named must exist."""
    from pathlib import Path

    from emseg.config import load_params

    if args.params is not None:
        return load_params(args.params)
    return load_params(DEFAULT_PARAMS) if Path(DEFAULT_PARAMS).exists() else None


def _claim(args: argparse.Namespace) -> None:
    """Before loading anything: the output may be written (and replaced only if emseg wrote it)."""
    from emseg.fsutil import claim_output

    from emseg.registry import is_uri

    inputs = [args.input] + ([args.model] if not is_uri(args.model) else [])
    claim_output(args.output, args.overwrite, inputs=inputs + [args.params or DEFAULT_PARAMS])


def _load_model(args: argparse.Namespace, params):
    from emseg.predict import load_model

    from emseg.registry import is_uri

    if is_uri(args.model):
        from emseg import tracking
        from emseg.config import TrackingParams

        cfg = params.tracking if params else TrackingParams()
        tracking.require_store(cfg)  # never create an empty store just to say the model is not in it
        tracking.configure(cfg)
    return load_model(args.model)


def _suggest(args: argparse.Namespace) -> None:
    from emseg.active.suggest import suggest
    from emseg.config import ActiveParams

    params = _optional_params(args)
    active = params.active if params else ActiveParams()
    # The simulation measured patches on slices binned by active.downsample: in the user's native pixels
    # its patch (and candidate stride) is that many times larger.
    native = active.downsample
    stride = active.stride * native if active.stride and args.patch_size is None else None
    defaults = {"k": active.query, "patch_size": active.patch_size * native, "mc_passes": active.mc_passes}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.k < 1 or args.every < 1 or args.patch_size < 32 or args.mc_passes < 2:
        raise EmsegError("-k and --every must be at least 1, --patch-size at least 32, --mc-passes at least 2")
    _claim(args)
    net, ref, _ = _load_model(args, params)
    s = suggest(net, args.input, args.output, k=args.k, unit=args.unit, patch_size=args.patch_size,
                strategy=args.strategy, every=args.every, mc_passes=args.mc_passes, blank=args.blank, model_ref=ref,
                overwrite=args.overwrite, max_overlap=active.max_overlap, stride=stride)
    where = ", ".join(f"slice {r['slice']} ({r['y']},{r['x']})" for r in s["suggestions"][:3])
    units = args.unit + ('es' if args.unit == 'patch' else 's')
    print(f"suggest: {s['k']} {units} of {s['size']} px to label ({args.strategy}; top: {where}) -> "
          f"{args.output}/suggestions.csv; paint the *_labels.tif templates (255 object, 0 background, "
          f"{args.blank} blank) and run dvc repro")


def _predict(args: argparse.Namespace) -> None:
    from emseg.config import EvaluateParams, InstanceParams

    natural = _default_format(args.input)
    fmt = args.fmt or natural
    big = {"--input-key": args.input_key, "--level": args.level, "--voxel-size": args.voxel_size,
           "--instances": args.instances, "--scheduler": args.scheduler, "--workers": args.workers}
    if fmt == "tiff" and any(v for v in big.values()):
        used = next(k for k, v in big.items() if v)
        raise ConfigError(f"{used} works with --format ome-zarr (blockwise prediction), not with --format tiff")
    if fmt == "tiff" and natural == "ome-zarr":
        raise ConfigError(f"{args.input}: Zarr and HDF5 inputs are predicted blockwise; use --format ome-zarr")
    params = _optional_params(args)
    _claim(args)
    # A missing file, a wrong key, a 2D array or a bad --block fails before the network loads.
    if fmt == "ome-zarr":
        from emseg.blockwise import parse_block
        from emseg.data.containers import check_grey, open_volume

        check_grey(open_volume(args.input, args.input_key, args.level))
        if args.block:
            parse_block(args.block, "--block")
    else:
        from emseg.data.io import inspect_stack

        inspect_stack(args.input)
    from emseg.predict import predict_blockwise, predict_to_folder  # torch: after the quick checks

    net, ref, meta = _load_model(args, params)
    ev = params.evaluate if params else EvaluateParams()
    threshold = params.train.threshold if params else 0.5
    instances, tta = ev.instances, ev.inference.tta
    post = meta["postprocess"]
    # z-averaging: the flag, else what the weights carry (a record from before the choice existed: off), else params
    z_avg = (args.z_average == "on" if args.z_average is not None
             else bool(post.get("z_average", False)) if "threshold" in post else ev.z_average)
    if "threshold" in post:  # the weights carry what was chosen for them on validation: it wins over params.yaml
        try:
            instances = InstanceParams.model_validate({**ev.instances.model_dump(), **post["instances"]})
            threshold, tta = float(post["threshold"]), bool(post["tta"])
        except (TypeError, ValueError) as exc:
            raise EmsegError(f"{args.model}: its post-processing record is damaged ({exc})") from None
        print(f"predict: threshold {threshold:g}, watershed h={instances.h:g}, flip TTA {'on' if tta else 'off'}, "
              f"z-averaging {'on' if z_avg else 'off'}{' (--z-average)' if args.z_average else ''}, as chosen for "
              f"{args.model} on {post.get('chosen_on', 'its validation slices')}")
    elif post:  # a version registered before its weights carried their post-processing: its tags say
        if ev.instances.h_choices and "instances" in post:  # h was chosen on validation only when h_choices is set
            instances = ev.instances.model_copy(update={"h": post["instances"]["h"]})
            print(f"predict: watershed h={instances.h:g}, as chosen on the validation slices for {args.model}")
        tta = post.get("tta", tta)
    inference = ev.inference.model_copy(update={"tta": args.tta or tta})
    if fmt == "tiff":
        s = predict_to_folder(net, args.input, args.output, overwrite=args.overwrite, model_ref=ref,
                              threshold=threshold, inference=inference, instances=instances, z_average=z_avg)
    else:
        s = predict_blockwise(net, args.input, args.output, overwrite=args.overwrite, model_ref=ref,
                              threshold=threshold, inference=inference, instances=instances,
                              input_key=args.input_key, level=args.level, voxel_size=args.voxel_size,
                              mode=args.instances, block=args.block, scheduler=args.scheduler, workers=args.workers,
                              z_average=z_avg)
    print(f"predict: {s['shape'][0]} slices of {s['shape'][1]}x{s['shape'][2]}, {s['objects']} objects "
          f"({s.get('instances_mode', '2d')}) -> {args.output}")


def _default_format(path: str) -> str:
    """ome-zarr for Zarr stores and HDF5 files, tiff for TIFFs and folders of slices."""
    from emseg.data.containers import is_container

    return "ome-zarr" if is_container(path) else "tiff"


def _stage(command: str):
    """The `run` function of the stage behind a command (imported here: `emseg --help` stays fast)."""
    if command == "fetch":
        from emseg.stages.fetch import run
    elif command == "prepare":
        from emseg.stages.prepare import run
    elif command == "tune":
        from emseg.stages.tune import run
    elif command == "train":
        from emseg.stages.train import run
    elif command == "evaluate":
        from emseg.stages.evaluate import run
    elif command == "register":
        from emseg.stages.register import run
    elif command == "pretrain":
        from emseg.stages.pretrain import run
    elif command == "ssl":
        from emseg.stages.ssl import run
    elif command == "learning-curve":
        from emseg.stages.learning_curve import run
    elif command == "active-learning":
        from emseg.stages.active_learning import run
    else:
        raise ValueError(f"no stage for command {command!r}")
    return run


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from emseg.errors import DataError, OutputError
    from emseg.export import export
    from emseg.fsutil import MARKER, claim_output
    from emseg.paths import RAW_DIR
    from emseg.registry import is_uri

    sample = args.sample or str(Path(RAW_DIR) / "train_image.tif")
    if not Path(sample).exists():
        raise DataError(f"{sample}: not found; give --sample, a stack to cut the package's test input from")
    if not args.output.endswith(".zip"):
        claim_output(args.output, args.overwrite, inputs=[sample, args.params or DEFAULT_PARAMS]
                     + ([args.model] if not is_uri(args.model) else []))
        marker = Path(args.output) / MARKER
        if marker.is_file() and '"export"' not in marker.read_text():
            raise OutputError(f"{args.output}: holds another emseg command's output, not a package; refusing to "
                              "replace it; choose a new output")
    params = _optional_params(args)
    net, ref, meta = _load_model(args, params)
    out = export(net, ref, meta, args.output, sample, args.z, args.overwrite, args.author, args.license)
    print(f"export: {ref} -> {out} (bioimage.io model 0.5: state dict + TorchScript; checked with bioimageio.spec "
          "and bioimageio.core)")


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "predict":
        _predict(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "suggest":
        _suggest(args)
    elif args.command == "promote":
        from emseg import tracking
        from emseg.config import load_params
        from emseg.registry import promote

        cfg = load_params(args.params or DEFAULT_PARAMS).tracking
        tracking.require_store(cfg)
        tracking.configure(cfg)
        promote(args.name, args.version, args.alias)
        print(f"promote: {args.name} version {args.version} now has alias {args.alias!r}")
    else:
        _stage(args.command)(args.params or DEFAULT_PARAMS)


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a cluster's time limit, a closed terminal): unwound like Ctrl-C, so every
    temporary output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread (an embedding program): leave its handlers
            pass
    return old


def _os_error_line(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else ""
    why = "name too long (a path component over 255 bytes?)" if exc.errno == errno.ENAMETOOLONG else (
        "disk full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc))
    return f"{name}: {why}" if name else why


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    old_handlers = _install_signal_handlers()
    try:
        _dispatch(args)
    except EmsegError as exc:
        _close_progress_bars()  # so the error starts a line of its own
        print(f"emseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the file system said no (permissions, names too long, a full disk): the user's to fix
        _close_progress_bars()
        print(f"emseg {args.command}: error: {_os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        _close_progress_bars()
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"emseg {args.command}: interrupted ({signal.Signals(signum).name}); nothing half-written was kept",
              file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
