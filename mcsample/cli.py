"""The ``mcsample`` command line: ``mcsample demo``, ``mcsample conformers``, ``mcsample peptide``.

Nothing heavy is imported before a subcommand runs: ``mcsample --help`` and ``--version`` do not
import torch, and the engine stays usable without RDKit or OpenMM. The ``conformers`` and
``peptide`` parsers live with their APIs (``cli`` in :mod:`mcsample.systems.conformers` and
:mod:`mcsample.peptide_sampling`) and use the helpers here.

Errors in the input (a missing file, a bad SMILES or peptide sequence, an unsupported element,
a non-positive count, an existing output without ``--overwrite``) end the program with one line
``mcsample <command>: error: <problem>`` on stderr and exit status 2; a missing optional
dependency names the extra to install, with exit status 1. ``mcsample --debug <command> ...``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

#: exit status for bad input (argparse's convention) and for a missing optional dependency
EXIT_USAGE, EXIT_MISSING_DEPENDENCY, EXIT_INTERRUPTED = 2, 1, 130


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``<prog>: error: <message>``,
    with exit status 2 (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse ``type``: a seed for ``torch.Generator().manual_seed``, an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2^64), got {value}")
    return value


def add_debug(parser: argparse.ArgumentParser) -> None:
    """The ``--debug`` flag every subcommand accepts (as does ``mcsample --debug``)."""
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the traceback instead of one line (default: off)"
    )


def check_output(path: str, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``; refuse a folder."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")


def _message(err: BaseException) -> str:
    """One line for ``err``."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _demo(args: argparse.Namespace) -> int:
    from mcsample._optional import require

    require("matplotlib", extra="plots", by="mcsample demo")
    import torch

    from mcsample.demo import run

    print(f"mcsample demo: writing to {os.path.abspath(args.out)}")
    run(
        out_dir=args.out,
        num_particles=args.particles,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.quiet,
    )
    if not args.no_peptide:
        from mcsample.demo import run_peptide

        run_peptide(out_dir=args.out, generator=torch.Generator().manual_seed(args.seed), progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (``demo`` in full; ``conformers`` and ``peptide`` listed, parsed by
    their own ``cli``)."""
    from mcsample._version import __version__

    parser = ArgumentParser(
        prog="mcsample",
        description="Monte Carlo sampling for science: importance sampling, SMC and "
        "Feynman-Kac correctors on PyTorch. `mcsample COMMAND --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mcsample {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the traceback instead of one line (default: off)"
    )
    sub = parser.add_subparsers(dest="command", metavar="command")

    demo = sub.add_parser(
        "demo",
        help="adaptive SMC on a 10-d Gaussian mixture checked against exact answers, then "
        "alanine dipeptide from the shipped Boltzmann generator",
    )
    demo.add_argument(
        "--out",
        default="outputs/demo",
        help="output folder, created if missing; its summary.json, marginals.png and "
        "peptide_summary.json are replaced (default: %(default)s)",
    )
    demo.add_argument(
        "--particles", type=positive_int, default=4096, help="number of SMC particles (default: %(default)s)"
    )
    demo.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    demo.add_argument(
        "--no-peptide", action="store_true", help="skip the alanine-dipeptide Boltzmann-generator part (default: off)"
    )
    add_debug(demo)
    demo.set_defaults(func=_demo)

    sub.add_parser(
        "conformers",
        add_help=False,
        help="Boltzmann-weighted conformers of a molecule (SMILES, or an .sdf/.mol/.mol2/.pdb file) "
        "-> SDF; `mcsample conformers --help` for options",
    )
    sub.add_parser(
        "peptide",
        add_help=False,
        help="Boltzmann-weighted peptide configurations from the shipped normalizing flow "
        "(IS or SMC) -> PDB/DCD/XTC/SDF + JSON; `mcsample peptide --help` for options",
    )
    return parser


def _subcommand(name: str):
    """The ``cli(argv)`` of a subcommand whose parser lives with its API, or None."""
    if name == "conformers":
        from mcsample.systems.conformers import cli

        return cli
    if name == "peptide":
        from mcsample.peptide_sampling import cli

        return cli
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``mcsample ARGV``; returns the exit status (0, or 1 / 2 / 130 after a one-line error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    debug = "--debug" in head
    while argv[:1] == ["--debug"]:
        argv = argv[1:]
    command = argv[0] if argv and argv[0] in ("demo", "conformers", "peptide") else None
    prog = f"mcsample {command}" if command else "mcsample"
    try:
        if command in ("conformers", "peptide"):
            rest = (["--debug"] if debug else []) + argv[1:]
            return int(_subcommand(command)(rest) or 0)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except SystemExit as done:  # argparse: --help, --version, or a one-line usage error
        return done.code if isinstance(done.code, int) else 0 if done.code is None else EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as err:
        if debug:
            raise
        print(f"{prog}: error: {_message(err)}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except (ValueError, OSError) as err:
        if debug:
            raise
        print(f"{prog}: error: {_message(err)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
