"""Conservative (uncertainty-deducted) CO2e under common carbon-standard rules.

Each rule returns the deduction and the conservative value with its source. The rules are simplified
readings of the documents named; methodologies are revised often, so the user must check the version in
force (and the exact formula of the section cited) before reporting credits.
"""

from __future__ import annotations

import math
from typing import Any

CHECK_NOTE = ("Simplified reading; check the methodology version in force and its exact formula before "
              "using this number for credits.")

ART_TREES_FACTOR = 0.524417  # ART-TREES v2.0 section 8: UA = 0.524417 x HW90% / 1.645006
ART_TREES_Z90 = 1.645006


def vm0047_deduction(mean_t: float, halfwidth90_pct: float) -> dict[str, Any]:
    """VM0047-style: deduct the 90% CI half-width (i.e. report the lower 90% bound); none above 100%."""
    hw = _finite(halfwidth90_pct)
    deduction = 100.0 if hw > 100.0 else hw
    return _rule("VM0047-style", "deduct the 90% confidence half-width; 0 credits if it exceeds 100% of the "
                 "mean", "Verra VM0047 Afforestation, Reforestation and Revegetation v1.0, uncertainty "
                 "section (8.5); sources disagree on the exact deduction formula", mean_t, deduction)


def vmd0017_deduction(mean_t: float, halfwidth95_pct: float) -> dict[str, Any]:
    """VMD0017: no deduction up to 15% at 95% confidence; above, NER x (100% - U + 15%)."""
    u = _finite(halfwidth95_pct)
    deduction = 0.0 if u <= 15.0 else min(u - 15.0, 100.0)
    return _rule("VMD0017", "U = 95% CI half-width; U <= 15%: no deduction, else adjusted = NER x (100% - U "
                 "+ 15%)", "Verra VMD0017 Estimation of Uncertainty for REDD+ Project Activities (VM0007 "
                 "module)", mean_t, deduction)


def art_trees_deduction(mean_t: float, halfwidth90_pct: float, n_draws: int | None = None) -> dict[str, Any]:
    """ART-TREES 2.0: UA = 0.524417 x HW90% / 1.645006; deduction = estimate x UA. ``n_draws``: the Monte
    Carlo draws behind HW90% (ART-TREES asks for 10,000); stated in the formula text when given."""
    ua = ART_TREES_FACTOR * _finite(halfwidth90_pct) / ART_TREES_Z90
    draws = "10,000 draws" if n_draws is None else f"{n_draws:,} draws"
    if n_draws is not None and n_draws < 10_000:
        draws += "; ART-TREES asks for 10,000: --n-draws 10000"
    return _rule("ART-TREES", f"UA = 0.524417 x HW90% / 1.645006 (Monte Carlo, 90% CI, {draws}); "
                 "deduction = estimate x UA", "ART The REDD+ Environmental Excellence Standard (TREES) v2.0, "
                 "section 8 (uncertainty); allometric error is exempt there but included here, so this is "
                 "more conservative than required", mean_t, min(ua, 100.0))


def conservative_estimates(mean_t: float, halfwidth90_pct: float, halfwidth95_pct: float,
                           n_draws: int | None = None) -> list[dict]:
    """All rules for a total (t CO2e) and its 90% / 95% half-widths (% of the mean) from ``n_draws``."""
    return [vm0047_deduction(mean_t, halfwidth90_pct), vmd0017_deduction(mean_t, halfwidth95_pct),
            art_trees_deduction(mean_t, halfwidth90_pct, n_draws)]


def _finite(pct: float) -> float:
    """A half-width in %; an undefined one (no trees, zero mean) counts as 100% (no credits)."""
    return float(pct) if pct is not None and math.isfinite(pct) else 100.0


def _rule(name: str, formula: str, source: str, mean_t: float, deduction_pct: float) -> dict[str, Any]:
    mean_t = float(mean_t) if math.isfinite(mean_t) else 0.0
    return {"rule": name, "formula": formula, "source": source, "deduction_pct": float(deduction_pct),
            "conservative_co2e_t": max(mean_t * (1.0 - deduction_pct / 100.0), 0.0), "note": CHECK_NOTE}
