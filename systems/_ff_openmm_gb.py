r"""Building the OBC generalized-Born term from OpenMM's GB forces.

:func:`_obc_from_gbsaobc` reads a ``GBSAOBCForce`` (OBC2 with the ACE surface term and
Tinker's inside-sphere correction). :func:`_obc_from_custom_gb` recognises the
``CustomGBForce`` that ``openmm.app.internal.customgbforces`` generates for OBC1/OBC2
(amber's ``implicit/obc1.xml``, ``obc2.xml``, prmtop ``igb=2``/``igb=5``): its expressions
are split at ``;`` into a main expression and definitions (:func:`_split_expression`) and
compared with the known OBC forms, and the constants (:math:`\alpha,\beta,\gamma`, the
Coulomb constant, dielectrics, :math:`\kappa`, surface-term constants, cutoff shift) are read
out of them. Custom expressions are never interpreted generically: anything else raises
:class:`~mcsample.systems.forcefield.UnsupportedForceError`.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ._ff_terms import ONE_4PI_EPS0, OBCGeneralizedBorn, UnsupportedForceError


def _split_expression(expr: str) -> tuple[str, dict[str, str]]:
    """``"main; a=1; b=c+d"`` -> ("main", {"a": "1", "b": "c+d"}), whitespace removed."""
    parts = [p for p in expr.replace(" ", "").replace("\n", "").split(";") if p]
    defs = {}
    for p in parts[1:]:
        name, _, value = p.partition("=")
        defs[name] = value
    return parts[0], defs


_NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_I_EXPR = "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0)"
_I_DEFS = {"U": "r+sr2", "L": "max(or1,D)", "D": "abs(r-sr2)"}
_B_RE = re.compile(r"1/\(1/or-tanh\((.+)\)/radius\)")
_POLYS = {  # tanh argument -> (alpha, beta, gamma), OBC1 (igb=2) and OBC2 (igb=5)
    "0.8*psi+2.909125*psi^3": (0.8, 0.0, 2.909125),
    "psi-0.8*psi^2+4.85*psi^3": (1.0, 0.8, 4.85),
}
_SELF_RE = re.compile(
    r"-0\.5\*" + _NUM + r"\*\(1/soluteDielectric-(1|exp\(-kappa\*B\))/solventDielectric\)\*charge\^2/B"
)
_ACE_RE = re.compile(_NUM + r"\*\(radius\+" + _NUM + r"\)\^2\*\(radius/B\)\^6")
_PAIR_RE = re.compile(
    r"-" + _NUM + r"\*\(1/soluteDielectric-(1|exp\(-kappa\*f\))/solventDielectric\)"
    r"\*charge1\*charge2(/f|\*\(1/f-" + _NUM + r"\))"
)
_F_EXPR = "sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))"


def _obc_from_custom_gb(force) -> OBCGeneralizedBorn:
    """Recognise the OBC1/OBC2 CustomGBForce of openmm.app.internal.customgbforces."""
    import openmm

    def fail(why: str):
        raise UnsupportedForceError(
            f"CustomGBForce not recognised as OpenMM's OBC1/OBC2 (amber implicit/obc1.xml, "
            f"obc2.xml or prmtop igb=2/5): {why}. Only these generalized-Born models are "
            "supported; GBn/GBn2/HCT and arbitrary custom expressions are not."
        )

    names = [force.getPerParticleParameterName(i) for i in range(force.getNumPerParticleParameters())]
    if names != ["charge", "or", "sr"]:
        fail(f"per-particle parameters {names}, expected ['charge', 'or', 'sr']")
    if force.getNumTabulatedFunctions() > 0:
        fail("it uses tabulated functions")
    globals_ = {
        force.getGlobalParameterName(i): force.getGlobalParameterDefaultValue(i)
        for i in range(force.getNumGlobalParameters())
    }
    if force.getNumComputedValues() != 2:
        fail(f"{force.getNumComputedValues()} computed values, expected 2 (I and B)")
    name_i, expr_i, type_i = force.getComputedValueParameters(0)
    name_b, expr_b, type_b = force.getComputedValueParameters(1)
    main_i, defs_i = _split_expression(expr_i)
    if (
        name_i != "I"
        or type_i != openmm.CustomGBForce.ParticlePairNoExclusions
        or main_i != _I_EXPR
        or defs_i != _I_DEFS
    ):
        fail(f"computed value {name_i!r} = {expr_i!r} is not the OBC descreening integral")
    main_b, defs_b = _split_expression(expr_b)
    m = _B_RE.fullmatch(main_b)
    if (
        name_b != "B"
        or type_b != openmm.CustomGBForce.SingleParticle
        or m is None
        or m.group(1) not in _POLYS
        or defs_b.get("psi") != "I*or"
        or defs_b.get("radius") != "or+offset"
    ):
        fail(f"computed value {name_b!r} = {expr_b!r} is not an OBC Born radius")
    alpha, beta, gamma = _POLYS[m.group(1)]
    offset = float(defs_b.get("offset", globals_.get("offset", "nan")))

    def constant(defs, key):
        if key in defs:
            return float(defs[key])
        if key in globals_:
            return float(globals_[key])
        fail(f"no value for {key!r}")

    self_k = ace = probe = pair = None
    kappa = 0.0
    cutoff_expr = None
    eps_in = eps_out = None
    for t in range(force.getNumEnergyTerms()):
        expr, kind = force.getEnergyTermParameters(t)
        main, defs = _split_expression(expr)
        if kind == openmm.CustomGBForce.SingleParticle and (ms := _SELF_RE.fullmatch(main)):
            self_k = float(ms.group(1))
            eps_in, eps_out = constant(defs, "soluteDielectric"), constant(defs, "solventDielectric")
            if ms.group(2) != "1":
                kappa = constant(defs, "kappa")
        elif kind == openmm.CustomGBForce.SingleParticle and (ma := _ACE_RE.fullmatch(main)):
            if defs.get("radius") != "or+offset":
                fail(f"surface term {expr!r} with an unexpected radius")
            ace, probe = float(ma.group(1)), float(ma.group(2))
        elif kind == openmm.CustomGBForce.ParticlePairNoExclusions and (mp := _PAIR_RE.fullmatch(main)):
            if defs.get("f") != _F_EXPR:
                fail(f"pair term {expr!r} with an unexpected f")
            pair = float(mp.group(1))
            cutoff_expr = mp.group(4)
        else:
            fail(f"energy term {t} {expr!r} (type {kind}) is not one of the OBC terms")
    if self_k is None or pair is None:
        fail("the self-energy or the pair energy term is missing")
    if abs(self_k - pair) > 1e-9 * pair:
        fail("self and pair terms use different Coulomb constants")
    method = force.getNonbondedMethod()
    if method == openmm.CustomGBForce.NoCutoff:
        cutoff = None
        if cutoff_expr is not None:
            fail("a cutoff-shifted pair term with NoCutoff")
    elif method == openmm.CustomGBForce.CutoffNonPeriodic:
        cutoff = float(force.getCutoffDistance()._value)
        if cutoff_expr is None or abs(1.0 / float(cutoff_expr) - cutoff) > 1e-9 * cutoff:
            fail(f"the pair term's shift {cutoff_expr} does not match the cutoff {cutoff} nm")
    else:
        fail("periodic boundary conditions are not supported")
    n = force.getNumParticles()
    params = np.array([force.getParticleParameters(i) for i in range(n)], dtype=np.float64).reshape(n, 3)
    gb = OBCGeneralizedBorn(
        charge=params[:, 0],
        offset_radius=params[:, 1],
        scaled_radius=params[:, 2],
        offset=offset,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        ke=self_k,
        solute_dielectric=eps_in,
        solvent_dielectric=eps_out,
        ace=ace,
        probe=0.14 if probe is None else probe,
        cutoff=cutoff,
        kappa=kappa,
        inside_term=False,
        name="CustomGBForce",
    )
    gb.model = "OBC2" if beta else "OBC1"
    return gb


def _obc_from_gbsaobc(force) -> OBCGeneralizedBorn:
    """``GBSAOBCForce`` (OBC2, ACE surface term with its surface-area energy)."""
    import openmm

    method = force.getNonbondedMethod()
    if method == openmm.GBSAOBCForce.NoCutoff:
        cutoff = None
    elif method == openmm.GBSAOBCForce.CutoffNonPeriodic:
        cutoff = float(force.getCutoffDistance()._value)
    else:
        raise UnsupportedForceError("GBSAOBCForce with periodic boundary conditions is not supported")
    n = force.getNumParticles()
    rows = [force.getParticleParameters(i) for i in range(n)]
    q = np.array([r[0]._value for r in rows])
    radius = np.array([r[1]._value for r in rows])
    scale = np.array([r[2] for r in rows], dtype=np.float64)
    offset = 0.009
    eps_in, eps_out = float(force.getSoluteDielectric()), float(force.getSolventDielectric())
    sa = float(force.getSurfaceAreaEnergy()._value)
    gb = OBCGeneralizedBorn(
        charge=q,
        offset_radius=radius - offset,
        scaled_radius=(radius - offset) * scale,
        offset=offset,
        alpha=1.0,
        beta=0.8,
        gamma=4.85,
        ke=ONE_4PI_EPS0,
        solute_dielectric=eps_in,
        solvent_dielectric=eps_out,
        ace=4.0 * math.pi * sa if sa != 0.0 else None,
        probe=0.14,
        cutoff=cutoff,
        kappa=0.0,
        inside_term=True,
        name="GBSAOBCForce",
    )
    gb.model = "OBC2"
    return gb
