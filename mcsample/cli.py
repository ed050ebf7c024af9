"""The ``mcsample`` command line: ``mcsample --help``, ``mcsample demo`` and the jobs of later parts.

Subcommands import their modules lazily, so ``mcsample --help`` is instant and the engine
stays importable without RDKit or OpenMM.
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from mcsample.demo import run

    run(out_dir=args.out, num_particles=args.particles, seed=args.seed, progress=not args.quiet)
    if not args.no_peptide:
        from mcsample.demo import run_peptide

        run_peptide(out_dir=args.out, seed=args.seed, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcsample",
        description="Monte Carlo sampling for science: importance sampling, SMC and "
        "Feynman-Kac correctors on PyTorch.",
    )
    from mcsample import __version__

    parser.add_argument("--version", action="version", version=f"mcsample {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    demo = sub.add_parser("demo", help="adaptive SMC on a 10-d Gaussian mixture checked against exact answers, then "
                          "alanine dipeptide from the shipped Boltzmann generator")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--particles", type=int, default=4096, help="number of particles (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--no-peptide", action="store_true",
                      help="skip the alanine-dipeptide Boltzmann-generator part")
    demo.set_defaults(func=_demo)

    conf = sub.add_parser(
        "conformers", add_help=False,
        help="Boltzmann-weighted conformers of a molecule (SMILES or SDF) -> SDF; "
        "`mcsample conformers --help` for options",
    )
    sub.add_parser(
        "peptide", add_help=False,
        help="Boltzmann-weighted peptide configurations from the shipped normalizing flow "
        "(IS or SMC) -> PDB/DCD + JSON; `mcsample peptide --help` for options",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["conformers"]:  # its own parser (options and --help) lives with the API
        from mcsample.conformers import cli

        return cli(argv[1:])
    if argv[:1] == ["peptide"]:
        from mcsample.peptide_sampling import cli as peptide_cli

        return peptide_cli(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
