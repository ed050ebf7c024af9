"""Packaging: the engine works without the extras, a module that needs one names it, and the
dependencies declared in pyproject.toml are exactly the ones the code imports."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mcsample", "systems", "flows")  # installed as mcsample, mcsample.systems, mcsample.flows
DISTRIBUTION = "mcsample-torch"

#: distribution name (lower case) -> import name, where they differ or to be explicit
IMPORT_NAME = {
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "openmm": "openmm",
    "openmmtools": "openmmtools",
    "mdtraj": "mdtraj",
    "rdkit": "rdkit",
    "zuko": "zuko",
    "numba": "numba",
    "pot": "ot",
    "pyro-ppl": "pyro",
    "matplotlib": "matplotlib",
    "scikit-learn": "sklearn",
    "scikit-image": "skimage",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "pytest-xdist": "xdist",
    "ruff": "ruff",
}
#: extras that are tools or folders outside the package, not imported by it
NOT_RUNTIME = {"test", "examples", "docs", "all"}

#: every optional import: blocked in the subprocesses below
BLOCKED = [
    "rdkit",
    "openmm",
    "openmmtools",
    "mdtraj",
    "pyro",
    "zuko",
    "ot",
    "matplotlib",
    "numba",
    "sklearn",
    "skimage",
]

BLOCKER = textwrap.dedent(f"""
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _Block())
""")


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env_code = BLOCKER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", env_code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _readme_first_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## A first example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_engine_runs_the_readme_example_without_any_extra(tmp_path):
    """With RDKit, OpenMM, openmmtools, MDTraj, Pyro, zuko, POT, matplotlib, numba, scikit-learn
    and scikit-image unimportable, ``import mcsample`` works, the engine modules import, and the
    README's first example (IS and SMC on analytic targets) runs to the numbers it prints."""
    code = _readme_first_example()
    before = """
        import mcsample as mc
        import mcsample.correctors, mcsample.posterior, mcsample.flows.diffusion
        import mcsample.systems.analytic, mcsample.systems.inverse_problems, mcsample.systems.analysis
        """
    after = """
        print("extras loaded:", any(m in sys.modules for m in ("rdkit", "openmm", "zuko", "numba")))
        """
    proc = _run_blocked(textwrap.dedent(before) + code + textwrap.dedent(after), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "extras loaded: False" in out
    # the numbers the README shows as comments are the ones printed
    for line in re.findall(r"^# (ESS .*|SMCResult.*|mode weights .*)$", code, re.M):
        assert line in out, (line, out)
    assert "k-hat > 0.7: do not trust this; use SMC" in out


def test_modules_that_need_an_extra_name_it(tmp_path):
    """Importing a module whose dependencies are missing raises ImportError naming the module,
    the missing package and the extra to install; the command line turns it into one line."""
    cases = {
        "mcsample.systems.peptides": ("OpenMM", "peptides"),
        "mcsample.systems.md": ("OpenMM", "peptides"),
        "mcsample.systems.forcefield": ("OpenMM", "peptides"),
        "mcsample.systems.coordinates": ("MDTraj", "peptides"),
        "mcsample.peptide_sampling": ("OpenMM", "peptides"),
        "mcsample.systems.molecules": ("RDKit", "molecules"),
        "mcsample.systems.conformers": ("RDKit", "molecules"),
        "mcsample.flows.von_mises": ("RDKit", "molecules"),
        "mcsample.flows.coupling": ("zuko", "flows"),
        "mcsample.flows.boltzmann_generator": ("zuko", "flows"),  # named by its coupling layers
    }
    proc = _run_blocked(
        f"""
        import importlib, json
        out = {{}}
        for name in {list(cases)!r}:
            try:
                importlib.import_module(name)
                out[name] = None
            except ImportError as err:
                out[name] = str(err)
        import mcsample as mc
        try:
            mc.sample_conformers
        except ImportError as err:
            out["mc.sample_conformers"] = str(err)
        from mcsample.systems.inverse_problems import PyroTarget
        try:
            PyroTarget(lambda: None, observations={{}})
        except ImportError as err:
            out["PyroTarget"] = str(err)
        from mcsample.systems import analysis
        try:
            analysis.circular_wasserstein([0.0], [1.0])
        except ImportError as err:
            out["circular_wasserstein"] = str(err)
        from mcsample.cli import main
        out["cli status"] = main(["conformers", "CCO"])
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for module, (package, extra) in cases.items():
        msg = out[module]
        named = "mcsample.flows.coupling" if module.endswith("boltzmann_generator") else module
        assert msg.startswith(f"{named} needs "), msg
        assert package in msg and f"pip install '{DISTRIBUTION}[{extra}]'" in msg, msg
    assert out["mc.sample_conformers"].endswith(f"pip install '{DISTRIBUTION}[molecules]'")
    assert out["PyroTarget"] == f"PyroTarget needs Pyro: pip install '{DISTRIBUTION}[pyro]'"
    assert out["circular_wasserstein"].endswith(f"needs POT: pip install '{DISTRIBUTION}[peptides]'")
    assert out["cli status"] == 1
    err_lines = proc.stderr.strip().splitlines()
    assert err_lines == [
        f"mcsample conformers: error: mcsample.systems.conformers needs RDKit: pip install '{DISTRIBUTION}[molecules]'"
    ], proc.stderr


# -- declared dependencies == imported dependencies ------------------------------------------


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement(spec: str) -> tuple[str, list[str]]:
    """``"POT>=0.9"`` -> ``("pot", [])``; ``"mcsample-torch[a,b]"`` -> ``("mcsample-torch", ["a", "b"])``."""
    m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", spec)
    extras = [e.strip() for e in (m.group(2) or "").split(",") if e.strip()]
    return m.group(1).lower().replace("_", "-"), extras


def _declared(group: list[str], extras: dict) -> set[str]:
    """Import names of a requirement list, expanding self-references ``mcsample-torch[...]``."""
    names = set()
    for spec in group:
        dist, sub = _requirement(spec)
        if dist == DISTRIBUTION:
            for extra in sub:
                names |= _declared(extras[extra], extras)
        else:
            assert dist in IMPORT_NAME, f"add the import name of {dist!r} to IMPORT_NAME"
            names.add(IMPORT_NAME[dist])
    return names


def _imports(folders) -> set[str]:
    """Top-level names of every absolute import (module level or inside functions) in the
    Python files under ``folders``, less the standard library and the folders' own modules."""
    names, local = set(), set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            local.add(path.stem)  # the folder's own modules, e.g. examples' shared helpers
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - local - {"mcsample", "__future__"}


def test_declared_dependencies_are_the_imported_ones():
    """Every third-party package that mcsample/, systems/ and flows/ import is declared in
    ``dependencies`` or a runtime extra, and nothing is declared there that they never import;
    ``all`` holds every runtime extra, and tests/ and examples/ import only what the test and
    examples extras add to it."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    core = _declared(project["dependencies"], extras)
    runtime = {name: _declared(extras[name], extras) for name in extras if name not in NOT_RUNTIME}
    declared = core.union(*runtime.values())
    imported = _imports(PACKAGES)
    assert imported == declared, {
        "imported, undeclared": imported - declared,
        "declared, never imported": declared - imported,
    }
    assert core == {"torch", "numpy", "scipy", "tqdm"}
    assert _declared(extras["all"], extras) == declared - core
    assert _imports(["tests"]) <= declared | _declared(extras["test"], extras)
    assert _imports(["examples"]) <= declared | _declared(extras["examples"], extras)


def test_each_require_names_an_extra_that_provides_the_package():
    """Every ``require(pkg, ..., extra=X)`` in the package names an extra X of pyproject.toml
    whose requirements provide ``pkg``."""
    extras = _pyproject()["project"]["optional-dependencies"]
    calls = 0
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                    extra = next(k.value.value for k in node.keywords if k.arg == "extra")
                    modules = {a.value for a in node.args}
                    assert extra in extras, (path, extra)
                    assert modules <= _declared(extras[extra], extras), (path, modules, extra)
                    calls += 1
    assert calls >= 10


def test_engine_import_does_not_import_torch_or_extras():
    """``import mcsample`` is lazy: torch and the chemistry packages load on first use, so the
    command line's ``--help`` and ``--version`` answer at once."""
    code = (
        "import sys, mcsample; print(sorted(m for m in ('torch', 'rdkit', 'openmm', 'numba') "
        "if m in sys.modules)); print(mcsample.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "[]"
    version = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert version == "mcsample._version.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", out.splitlines()[1])


def test_smc_stays_the_function_after_the_submodule_is_imported():
    """``mcsample.smc`` names the function whether or not ``mcsample.smc`` (the module) was
    imported first."""
    code = (
        "import sys\nimport mcsample as mc\nfrom mcsample.smc import SMCState\nimport mcsample.smc\n"
        "print(callable(mc.smc), mc.smc.__module__, mc.smc is sys.modules['mcsample.smc'].smc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "mcsample.smc", "True"]
