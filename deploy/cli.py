"""``cxr-triage``: one command, a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import triage

from . import audit_cmd, dashboard_cmd, doctor, score
from .workstation import cli as workstation


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; each module registers its own subcommand."""
    parser = argparse.ArgumentParser(
        prog="cxr-triage",
        description="Chest X-ray triage: rank studies, flag the riskiest for a clinician, audit every decision. "
                    "A demonstration model orders a worklist; it does not diagnose.",
    )
    parser.add_argument("--version", action="version", version=f"cxr-triage {triage.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score.add_parser(subparsers)
    audit_cmd.add_parser(subparsers)
    dashboard_cmd.add_parser(subparsers)
    workstation.add_parser(subparsers)
    doctor.add_parser(subparsers)
    from training import cli as training_cli  # imports torch lazily, inside its commands

    training_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
