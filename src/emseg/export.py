"""`emseg export`: a trained model as a bioimage.io model package (format 0.5).

The package holds the weights twice (a PyTorch state dict with emseg.model.arch as its architecture,
and TorchScript), a test input cut from a real slice with the output emseg predicts for it, the
input normalisation, a cover, documentation and citations. It is written with bioimageio.spec and
checked with bioimageio.spec and bioimageio.core (the community's reference code) before it is put in
place, so ilastik, deepImageJ, QuPath and bioimageio.core users can run it. Nothing goes online.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from emseg.data.io import check_image_dtype, context_indices, inspect_stack, normalise, read_slices
from emseg.errors import DataError, EmsegError, OutputError
from emseg.fsutil import atomic_dir, atomic_file
from emseg.inference import Z_WEIGHTS, predict_slice
from emseg.model import arch
from emseg.model.network import ProbabilityModel, SegmentationNet, in_channels

TILE = 256  # side of the packaged test input (a multiple of 32, cut from the middle of a real slice)

# Training data emseg knows how to cite (data.source / the `dataset` tag of a run).
DATA_CITATIONS = {
    "epfl": ("Lucchi, Smith, Achanta, Knott, Fua (2012). Supervoxel-based segmentation of mitochondria in EM "
             "image stacks with learned shape features. IEEE TMI 31(2). EPFL CA1 hippocampus FIB-SEM dataset.",
             "10.1109/TMI.2011.2171705"),
    "vnc": ("Gerhard, Funke, Martel, Cardona, Fetter (2013). Segmented anisotropic ssTEM dataset of neural "
            "tissue (Drosophila VNC). figshare.", "10.6084/m9.figshare.856713"),
    "isbi2012": ("Arganda-Carreras et al. (2015). Crowdsourcing the creation of image segmentation algorithms "
                 "for connectomics. Frontiers in Neuroanatomy 9:142.", "10.3389/fnana.2015.00142"),
}
# bioimage.io tags by dataset: imaging modality and what was labelled.
DATA_TAGS = {"epfl": ["fib-sem", "mitochondria"], "vnc": ["sstem", "mitochondria"], "isbi2012": ["sstem", "membranes"]}
SMP = ("Iakubovskii, P. Segmentation Models Pytorch (the U-Net and its encoders).",
       "https://github.com/qubvel-org/segmentation_models.pytorch")


def _offline_environment() -> None:
    """bioimageio reads its settings when first imported: keep its cache out of the user's home."""
    os.environ.setdefault("BIOIMAGEIO_CACHE_PATH", str(Path(tempfile.gettempdir()) / "emseg-bioimageio-cache"))


def sample_tile(sample: str | Path, z: int | None, k: int) -> tuple[np.ndarray, int]:
    """The raw test input: slice ``z`` (default the middle one) of ``sample`` with its k - 1 neighbours,
    a TILE x TILE crop from its centre (smaller slices: their largest multiple of 32), float32 (k, s, s)."""
    info = inspect_stack(sample)
    check_image_dtype(info)
    n, h, w = info.shape
    z = n // 2 if z is None else z
    if not 0 <= z < n:
        raise DataError(f"{sample}: --slice {z} is outside its {n} slices (0 to {n - 1})")
    side = min(TILE, h // 32 * 32, w // 32 * 32)
    if side < 64:
        raise DataError(f"{sample}: slices of {h}x{w} px are too small for a test input (at least 64x64)")
    y0, x0 = (h - side) // 2, (w - side) // 2
    raw = [np.asarray(s)[y0:y0 + side, x0:x0 + side] for s in read_slices(info, context_indices(z, n, k))]
    return np.stack(raw).astype(np.float32), z


def _name(text: str) -> str:
    """bioimage.io names: letters, digits, spaces and _+-(); 5 to 128 characters."""
    return re.sub(r"[^A-Za-z0-9_+\-() ]+", " ", text).strip()[:128].ljust(5, "_")


def _cover(raw: np.ndarray, prob: np.ndarray, path: Path) -> None:
    """Input and foreground probability side by side (2:1, as bioimage.io recommends)."""
    from PIL import Image

    lo, hi = np.percentile(raw, [0.5, 99.5])
    img = np.clip((raw - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.concatenate([np.stack([img] * 3, -1),
                          np.stack([img * 0.4 + prob * 0.6, img * 0.4, img * 0.4 + (1 - prob) * 0.1], -1)], axis=1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)


def _documentation(ref: str, spec: dict, facts: dict, z: int, sample: str) -> str:
    k = in_channels(spec)
    weights = ", ".join(f"{w:g}" for w in Z_WEIGHTS)
    lines = [f"# emseg model {ref}", "",
             f"A {spec['arch']} ({spec['encoder']} encoder) trained with emseg to segment foreground "
             "(mitochondria or membranes, as labelled) in electron-microscopy slices.", "",
             "## Input", "",
             f"One slice{' with its ' + str(k - 1) + ' nearest z neighbours as channels' if k > 1 else ''}, "
             "any size that is a multiple of 32 (at least 64). It is z-scored by its own mean and standard "
             "deviation (emseg's `predict` z-scores a stack by the statistics of the whole stack: give tools "
             "large tiles, or whole slices, for the same result)."
             + (f" The network works at {spec['input_scale']:g} of the input resolution and returns the "
                "probability at the input's." if float(spec.get("input_scale", 1.0)) != 1.0 else ""), "",
             "## Output", "", "Foreground probability, float32 in [0, 1], the size of the input. emseg's own "
             "threshold and watershed (instances), and the flip averaging (`tta`) and z-averaging of each "
             f"slice's probability with its neighbours' (`z_average`: weights {weights}) that were chosen "
             "for this model on validation (below, where the registry records them), are not part of the "
             "package.", "",
             "## Training", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()] or ["- (a weights file with no registry record)"]
    lines += ["", "# Validation", "",
              f"The test input is a {TILE}-px crop from the centre of slice {z} of `{Path(sample).name}`; the test "
              "output is emseg's prediction for it, which both weight formats reproduce (checked with "
              "bioimageio.core when the package was written).", ""]
    return "\n".join(lines)


def _facts(meta: dict) -> tuple[dict, str | None]:
    """What the registry knows of the version the weights came from (``meta`` of emseg.predict.load_model:
    its tags, description and run; empty for a weights file): scores, data; and the dataset to cite."""
    tags = meta.get("tags", {})
    facts = {k: tags[k] for k in ("val_iou", "test_iou", "watershed_h", "tta", "z_average", "val_data_hash")
             if k in tags}
    if meta.get("description"):
        facts["description"] = meta["description"].replace("\n", " ")
    run_tags = {}
    if meta.get("run_id"):
        try:
            import mlflow

            run_tags = mlflow.MlflowClient().get_run(meta["run_id"]).data.tags
        except Exception:  # the run may have been deleted; the model still exports
            pass
    facts.update({k: run_tags[k] for k in ("dataset", "labelled_slices", "train_slices", "git_commit")
                  if k in run_tags})
    return facts, run_tags.get("dataset")


def build_package(net: SegmentationNet, ref: str, meta: dict, sample: str | Path, z: int | None, work: Path,
                  author: str = "emseg", license: str = "MIT"):
    """Write the package's files into ``work`` and return its bioimageio ModelDescr (not yet saved)."""
    _offline_environment()
    from bioimageio.spec import ValidationContext
    from bioimageio.spec.model import v0_5 as bmz

    spec = dict(net.spec)
    k = in_channels(spec)
    raw, z = sample_tile(sample, z, k)
    mean, std = float(raw.astype(np.float64).mean()), float(raw.astype(np.float64).std())
    if std < 1e-6:
        raise DataError(f"{sample}: slice {z} is blank at its centre (constant values); choose another --slice")
    prob = predict_slice(net, normalise(raw if k > 1 else raw[0], mean, std))
    np.save(work / "test_input.npy", raw[None])
    np.save(work / "test_output.npy", prob[None, None].astype(np.float32))
    torch.save(net.state_dict(), work / "weights.pt")
    shutil.copy(arch.__file__, work / "emseg_arch.py")
    with torch.no_grad():
        traced = torch.jit.trace(ProbabilityModel(net).eval(), torch.from_numpy(normalise(raw, mean, std))[None])
    traced.save(str(work / "weights_torchscript.pt"))
    _cover(raw[k // 2], prob, work / "cover.png")
    facts, dataset = _facts(meta)
    (work / "README.md").write_text(_documentation(ref, spec, facts, z, str(sample)))

    cite = [bmz.CiteEntry(text=SMP[0], url=bmz.HttpUrl(SMP[1]))]
    if dataset in DATA_CITATIONS:
        text, doi = DATA_CITATIONS[dataset]
        cite.insert(0, bmz.CiteEntry(text=text, doi=bmz.Doi(doi)))
    names = ["em"] if k == 1 else [f"z{d:+d}" if d else "z0" for d in range(-(k // 2), k // 2 + 1)]
    torch_version = bmz.Version(torch.__version__.split("+")[0])
    scale = float(spec.get("input_scale", 1.0))
    smallest = max(64, -(-int(np.ceil(16 / scale)) // 32) * 32)  # the encoder must see at least 32 px
    with ValidationContext(root=work, perform_io_checks=True):
        size = bmz.ParameterizedSize(min=smallest, step=32)
        inputs = bmz.InputTensorDescr(
            id=bmz.TensorId("raw"),
            axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=names),
                  bmz.SpaceInputAxis(id=bmz.AxisId("y"), size=size), bmz.SpaceInputAxis(id=bmz.AxisId("x"), size=size)],
            test_tensor=bmz.FileDescr(source=work / "test_input.npy"),
            data=bmz.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[bmz.ZeroMeanUnitVarianceDescr(kwargs=bmz.ZeroMeanUnitVarianceKwargs(
                axes=[bmz.AxisId("channel"), bmz.AxisId("y"), bmz.AxisId("x")]))])

        def same_as_input(axis: str):
            return bmz.SizeReference(tensor_id=bmz.TensorId("raw"), axis_id=bmz.AxisId(axis))

        outputs = bmz.OutputTensorDescr(
            id=bmz.TensorId("foreground"),
            axes=[bmz.BatchAxis(), bmz.ChannelAxis(channel_names=["foreground"]),
                  bmz.SpaceOutputAxis(id=bmz.AxisId("y"), size=same_as_input("y")),
                  bmz.SpaceOutputAxis(id=bmz.AxisId("x"), size=same_as_input("x"))],
            test_tensor=bmz.FileDescr(source=work / "test_output.npy"),
            data=bmz.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
        weights = bmz.WeightsDescr(
            pytorch_state_dict=bmz.PytorchStateDictWeightsDescr(
                source=work / "weights.pt", pytorch_version=torch_version,
                architecture=bmz.ArchitectureFromFileDescr(source=work / "emseg_arch.py",
                                                           callable=bmz.Identifier("EmsegProbabilities"),
                                                           kwargs={"spec": spec})),
            torchscript=bmz.TorchscriptWeightsDescr(source=work / "weights_torchscript.pt",
                                                    parent="pytorch_state_dict", pytorch_version=torch_version))
        return bmz.ModelDescr(
            name=_name(f"emseg {ref.rsplit('/', 1)[-1]} {spec['arch']} {spec['encoder']}"),
            description=f"U-Net segmentation of EM slices trained with emseg ({ref}); outputs foreground probability.",
            authors=[bmz.Author(name=author)], cite=cite, license=license,
            documentation=bmz.FileDescr(source=work / "README.md"), covers=[bmz.FileDescr(source=work / "cover.png")],
            tags=["electron-microscopy", "semantic-segmentation", "2d", "unet", "pytorch", "emseg",
                  *DATA_TAGS.get(dataset, [])],
            inputs=[inputs], outputs=[outputs], weights=weights)


def _first_error(exc: ValueError) -> str:
    """One short line from a pydantic validation error: the field, what was given, what is wanted."""
    errors = getattr(exc, "errors", None)
    if not callable(errors) or not errors():
        return str(exc).splitlines()[0][:200]
    e = errors()[0]
    field = ".".join(str(p) for p in e.get("loc", ()) if not str(p).startswith("function-"))
    if field.startswith("license"):
        return f"--license {e.get('input')!r} is not an SPDX licence id (for example MIT, CC-BY-4.0, Apache-2.0)"
    msg = e.get("msg", "")
    return f"{field or 'description'}: {msg[:160] + '...' if len(msg) > 160 else msg} (given {e.get('input')!r})"


def _an_emseg_package(path: Path) -> bool:
    """A zip holding a bioimage.io description tagged emseg: what --overwrite may replace."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return "emseg" in z.read("rdf.yaml").decode(errors="replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def check_package(path: Path) -> None:
    """Load the written package with bioimageio.spec, then let bioimageio.core run both weight formats
    on its test input against its test output; one line if either says no."""
    from bioimageio.core import test_model
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5 as bmz

    described = load_description(path, perform_io_checks=True)
    if not isinstance(described, bmz.ModelDescr):
        first = next((f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in described.validation_summary.errors), "invalid")
        raise EmsegError(f"{path}: bioimageio.spec rejects the package: {first}")
    summary = test_model(path, devices=["cpu"])  # where the test output was computed: no TF32 on a GPU
    if summary.status != "passed":
        failed = [f"{d.name}: {e.msg}" for d in summary.details for e in d.errors][:3]
        raise EmsegError(f"{path}: bioimageio.core's test of the package failed: {'; '.join(failed)}")


def export(net: SegmentationNet, ref: str, meta: dict, out: str | Path, sample: str | Path, z: int | None = None,
           overwrite: bool = False, author: str = "emseg", license: str = "MIT") -> Path:
    """Write the package to ``out`` (a .zip, or else a folder), checked before it is put in place."""
    _offline_environment()
    out = Path(out)
    with warnings.catch_warnings():  # torch.jit's deprecation notices, once per trace and load
        warnings.simplefilter("ignore", FutureWarning)
        return _export(net, ref, meta, out, sample, z, overwrite, author, license)


def _export(net, ref, meta, out: Path, sample, z, overwrite, author, license) -> Path:
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder

    if out.suffix == ".zip" and out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; choose another output or pass --overwrite")
    if out.suffix == ".zip" and out.exists() and not out.is_file():
        raise OutputError(f"{out}: is not a file; refusing to replace it")
    if out.suffix == ".zip" and out.exists() and not _an_emseg_package(out):
        raise OutputError(f"{out}: is not a bioimage.io package emseg wrote; refusing to replace it")
    with tempfile.TemporaryDirectory(prefix="emseg-export-") as tmp:
        work = Path(tmp) / "files"
        work.mkdir()
        try:
            descr = build_package(net, ref, meta, sample, z, work, author, license)
        except ValueError as exc:  # pydantic: a field bioimage.io does not accept (--author, --license)
            raise EmsegError(f"{out}: bioimage.io does not accept the description: {_first_error(exc)}") from None
        if out.suffix == ".zip":
            staged = Path(tmp) / out.name
            save_bioimageio_package(descr, output_path=staged)
            check_package(staged)
            with atomic_file(out, "wb") as fh, open(staged, "rb") as src:
                shutil.copyfileobj(src, fh)
        else:
            with atomic_dir(out, marker={"command": "export", "model": ref}) as folder:
                save_bioimageio_package_as_folder(descr, output_path=folder)
                check_package(folder / "rdf.yaml")
    return out
