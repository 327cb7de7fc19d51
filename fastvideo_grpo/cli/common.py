"""The command line every entry point shares: one parser for a recipe and its overrides, one error wrapper.

``config_parser`` gives ``--config`` plus, where they apply, ``--output-dir``, ``--resume``, ``--overwrite``,
``--no-progress``, ``--check`` (resolve the config and run the start-up checks, then exit) and
``--print-config`` (the resolved config as YAML, each value followed by where it came from: default,
recipe file, base recipe or command line). Every other ``--section.field=value`` argument overrides the
config; an unknown field names the one meant ("did you mean 'optim.lr'?", also across sections), and a
mistyped flag the flag meant. ``cli_entry(main)`` runs ``main`` for a script: a user error
(ValueError / FileNotFoundError) prints one ``error:`` line and exits 2, without a traceback.

Used by the train scripts (cli/train.py), the toy demo (train_scripts/train_toy_grpo.py), the distributed toy
script, the evaluation CLI, the export CLI and data_prep.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from ..config import RunConfig, annotated_yaml, config_sources, load_config

#: the flags ``config_parser`` can add, and the config field each sets
FLAG_FIELDS = {"output_dir": "train.output_dir", "resume": "train.resume", "overwrite": "train.overwrite",
               "no_progress": "log.progress"}


def config_parser(prog: Optional[str] = None, description: Optional[str] = None, default_config: Optional[str] = None,
                  *, flags: Sequence[str] = ("output_dir", "resume", "overwrite", "no_progress", "check"),
                  epilog: Optional[str] = None, config_required: Optional[bool] = None) -> argparse.ArgumentParser:
    """A parser with ``--config``, ``--print-config`` and the shared ``flags`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=epilog or "Any config field can be overridden: --section.field=value (e.g. "
                                "--grpo.group_size=12 --train.output_dir=outputs/x --rewards.0.weight=0.5).")
    required = default_config is None if config_required is None else config_required
    p.add_argument("--config", default=default_config, required=required,
                   help="YAML recipe" + (f" (default: {default_config}, found from any working folder)"
                                         if default_config else " (configs/*.yaml)"))
    add_shared_flags(p, flags)
    return p


def add_shared_flags(p: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    """The shared flags on any parser (``--print-config`` always)."""
    if "output_dir" in flags:
        p.add_argument("--output-dir", default=None, help="the run's output folder (sets train.output_dir)")
    if "resume" in flags:
        p.add_argument("--resume", default=None, help="checkpoint folder, 'latest' (error when there is none) or "
                                                      "'auto' (latest if any); sets train.resume")
    if "overwrite" in flags:
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an output folder that holds a run (deletes its checkpoints, metrics, "
                            "evaluations, export); sets train.overwrite")
    if "no_progress" in flags:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (sets log.progress=false)")
    if "check" in flags:
        p.add_argument("--check", action="store_true",
                       help="only resolve the config and run the start-up checks (files present), then exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, each value with where it came from) and exit")


def flag_overrides(args: argparse.Namespace) -> List[str]:
    """The overrides the shared flags stand for."""
    out = []
    if getattr(args, "resume", None) is not None:
        out.append(f"--train.resume={args.resume}")
    if getattr(args, "output_dir", None) is not None:
        out.append(f"--train.output_dir={args.output_dir}")
    if getattr(args, "no_progress", False):
        out.append("--log.progress=false")
    if getattr(args, "overwrite", False):
        out.append("--train.overwrite=true")
    return out


def check_unknown_flags(parser: argparse.ArgumentParser, overrides: Sequence[str], cls=RunConfig) -> None:
    """A ``--name`` that is neither a flag nor a config section / field (no dot, not a root field) is a mistyped
    flag: a ValueError naming the flag meant."""
    import dataclasses

    roots = {f.name for f in dataclasses.fields(cls)}
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    for a in overrides:
        if not a.startswith("--"):
            continue
        key = a[2:].split("=", 1)[0]
        if "." in key or key in roots:
            continue
        close = difflib.get_close_matches(f"--{key}", flags, n=1, cutoff=0.7)
        section = difflib.get_close_matches(key, sorted(roots), n=1, cutoff=0.75)
        hint = (f"; did you mean {close[0]}?" if close else
                f"; did you mean --{section[0]}.<field>=value?" if section else
                f"; flags: {' '.join(sorted(flags))}, or --section.field=value")
        raise ValueError(f"unrecognised argument --{key}{hint}")


def parse_config(parser: argparse.ArgumentParser, argv=None, extra_overrides: Sequence[str] = ()
                 ) -> Tuple[argparse.Namespace, Optional[RunConfig], List[str]]:
    """(args, the resolved config, the overrides applied). With ``--print-config`` the config is printed
    (annotated) and returned too; callers then stop (``args.print_config``)."""
    args, rest = parser.parse_known_args(argv)
    check_unknown_flags(parser, rest)
    overrides = list(extra_overrides) + list(rest) + flag_overrides(args)
    cfg = load_config(args.config, overrides)
    if getattr(args, "print_config", False):
        print_config(cfg, args.config, overrides)
    return args, cfg, overrides


def print_config(cfg: RunConfig, path: Optional[str], overrides: Sequence[str], file=None) -> None:
    """The resolved config as YAML with each value's source (``--print-config``)."""
    print(annotated_yaml(cfg, config_sources(path, overrides)), end="", file=file or sys.stdout, flush=True)


def cli_entry(main: Callable, *args) -> None:
    """``main(*args)`` for a script: user errors print one ``error:`` line and exit 2 (no traceback); a run
    stopped on purpose exits with its code (training/loop.py's ``run_cli``)."""
    from ..training.loop import run_cli

    run_cli(main, *args)
