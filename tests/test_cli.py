"""The command line and the default demo job."""

import json
import subprocess
import sys

from mcsample.cli import main


def test_help_lists_demo(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_writes_results_close_to_exact(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--particles", "1024", "--seed", "3", "--out", str(out), "--quiet"]) == 0
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
    assert "ESS" in capsys.readouterr().out
