"""The command line: help, the default demo job, and one-line errors for bad input."""

import argparse
import json
import subprocess
import sys

import pytest

from mcsample.cli import ArgumentParser, build_parser, main


def test_help_lists_demo(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_help_and_version_import_no_torch():
    """``mcsample --help`` and ``--version`` load neither torch nor the chemistry packages (what
    makes them answer at once; the time itself is measured, not asserted)."""
    code = (
        "import sys\nfrom mcsample.cli import main\n"
        "assert main(['--help']) == 0 and main(['--version']) == 0\n"
        "print(sorted(m for m in ('torch', 'rdkit', 'openmm', 'numba') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
    assert "mcsample 0.1" in r.stdout


def test_demo_writes_results_close_to_exact(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--particles", "1024", "--seed", "3", "--out", str(out), "--quiet", "--no-peptide"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "marginals.png").stat().st_size > 10_000
    assert abs(summary["log_evidence"] - summary["log_evidence_exact"]) < 5 * summary["log_evidence_stderr"] + 0.05
    assert max(abs(a - b) for a, b in zip(summary["mode_weights"], summary["mode_weights_exact"])) < 0.1


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "mcsample.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_conformers_subcommand_writes_weighted_sdf(tmp_path, capsys):
    from rdkit import Chem

    out = tmp_path / "c.sdf"
    assert main(["conformers", "CCOc1ccccc1", "-n", "16", "--method", "is", "-o", str(out)]) == 0
    mols = [m for m in Chem.SDMolSupplier(str(out), removeHs=False)]
    assert len(mols) == 16
    printed = capsys.readouterr().out
    assert "ESS" in printed and str(out) in printed  # the output path is printed


# -- every option says what it does and its default ------------------------------------------


class _Parsed(Exception):
    pass


def _parsers(monkeypatch) -> dict:
    """The parsers of ``mcsample``, ``demo``, ``conformers`` and ``peptide`` (built, not run)."""
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"mcsample": top, "demo": sub.choices["demo"]}

    def capture(self, args=None, namespace=None):
        parsers[self.prog.split()[-1]] = self
        raise _Parsed

    monkeypatch.setattr(ArgumentParser, "parse_args", capture)
    from mcsample.peptide_sampling import cli as peptide_cli
    from mcsample.systems.conformers import cli as conformers_cli

    for cli in (conformers_cli, peptide_cli):
        with pytest.raises(_Parsed):
            cli([])
    return parsers


def test_every_option_has_help_with_its_default(monkeypatch):
    """Each option of each subcommand has help text stating its default (``%(default)s``, or
    "default: off" for a flag)."""
    parsers = _parsers(monkeypatch)
    assert set(parsers) == {"mcsample", "demo", "conformers", "peptide"}
    checked = 0
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings:
                flag = isinstance(action, argparse._StoreTrueAction)
                assert ("(default: off)" if flag else "%(default)s") in action.help, (name, action.dest)
                checked += 1
    assert checked >= 20


# -- bad input: one line on stderr, exit status 2, no traceback -----------------------------


def _one_line_error(capfd, command: str, *needles: str) -> str:
    """The captured stderr is one line ``mcsample <command>: error: ...`` containing ``needles``."""
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mcsample {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["missing.sdf"], ["no such file: missing.sdf"]),  # a path, not a SMILES
        (["missing.MOL2"], ["no such file: missing.MOL2"]),
        (["C1CC("], ["could not parse SMILES 'C1CC('"]),
        (["[Se]CC[Se]"], ["no atom type", "Se"]),
        (["CCO", "-n", "0"], ["-n/--num-conformers", "positive", "0"]),
        (["CCO", "-n", "many"], ["-n/--num-conformers", "'many'"]),
        (["CCO", "-T", "-3"], ["-T/--temperature", "positive"]),
        (["CCO", "-o", "out.pdb"], ["--out must end in .sdf"]),
        (["notes.txt"], ["notes.txt", "unsupported molecule file type"]),
        (["folder.sdf"], ["folder.sdf is not a file"]),
        (["empty.sdf"], ["could not read a molecule from empty.sdf"]),
        (["CCO", "-o", "taken.sdf"], ["taken.sdf exists; pass --overwrite"]),
    ],
)
def test_conformers_bad_input(argv, needles, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("CCO\n")
    (tmp_path / "folder.sdf").mkdir()
    (tmp_path / "empty.sdf").write_text("")
    (tmp_path / "taken.sdf").write_text("keep me")
    assert main(["conformers", *argv]) == 2
    _one_line_error(capfd, "conformers", *needles)
    assert (tmp_path / "taken.sdf").read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["missing.pdb"], ["no such file: missing.pdb"]),
        (["XZ1"], ["no shipped flow for 'XZ1'", "not a peptide name or a sequence", "one-letter codes"]),
        (["A"], ["sequence of at least two one-letter codes"]),
        (["alanine_dipeptide", "-n", "0"], ["-n/--num-samples", "at least 2, got 0"]),
        (["alanine_dipeptide", "-n", "1"], ["at least 2"]),
        (["alanine_dipeptide", "--solvent", "water"], ["--solvent", "invalid choice"]),
        (["alanine_dipeptide", "-o", "x.gro"], ["--out must end in"]),
        (["alanine_dipeptide", "-o", "taken.pdb"], ["taken.pdb exists; pass --overwrite"]),
        (["alanine_dipeptide", "-o", "run.dcd"], ["run.weights.json exists; pass --overwrite"]),
    ],
)
def test_peptide_bad_input(argv, needles, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.pdb").write_text("keep me")
    (tmp_path / "run.weights.json").write_text("{}")
    assert main(["peptide", *argv]) == 2
    _one_line_error(capfd, "peptide", *needles)


@pytest.mark.parametrize(
    "argv, command, needles",
    [
        (["demo", "--particles", "0"], "demo", ["--particles", "positive"]),
        (["demo", "--seed", "-1"], "demo", ["--seed"]),
    ],
)
def test_demo_bad_input(argv, command, needles, capfd):
    assert main(argv) == 2
    _one_line_error(capfd, command, *needles)


def test_unknown_command_is_one_line(capfd):
    assert main(["sample"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcsample: error: argument command: invalid choice: 'sample'"), err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """``mcsample --debug CMD`` (or ``CMD ... --debug``) raises the error instead of one line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.sdf"):
        main(["--debug", "conformers", "missing.sdf"])
    with pytest.raises(ValueError, match="not a peptide name"):
        main(["peptide", "XZ1", "--debug"])


def test_error_exit_status_and_stderr_of_the_program(tmp_path):
    """Run as a program: exit status 2 and exactly one line on stderr, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "mcsample.cli", "conformers", "missing.sdf"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["mcsample conformers: error: no such file: missing.sdf"]
    assert r.stdout == ""
