"""`emseg <command>`: a thin front to the stages. User errors print one line and exit 1."""

from __future__ import annotations

import argparse
import sys

from emseg.errors import EmsegError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emseg", description="Few-label EM segmentation (DVC + MLflow + Optuna).")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("fetch", help="materialise the raw stacks of data.source into data/raw")
    sub.add_parser("prepare", help="validate raw stacks, choose slices, write data/prepared")
    sub.add_parser("tune", help="Optuna study over learning rate and batch size (resumable)")
    sub.add_parser("train", help="train the network, track the run in MLflow")
    return p


def _dispatch(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(f"emseg.stages.{args.command}").run(args.params)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _dispatch(args)
    except EmsegError as exc:
        print(f"emseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"emseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
