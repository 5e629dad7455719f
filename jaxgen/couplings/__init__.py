"""Couplings: how noise (or source) points are paired with data points (independent by default; reflow)."""

from jaxgen.couplings.reflow import pair_sampler, reflow_coupling, reflow_couplings

__all__ = ["reflow_couplings", "reflow_coupling", "pair_sampler"]
