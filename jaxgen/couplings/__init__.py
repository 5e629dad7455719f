"""Couplings: how noise (or source) points are paired with data points (independent by default; minibatch optimal
transport; reflow)."""

from jaxgen.couplings.ot import (Coupling, ExactOT, IndependentCoupling, OnMesh, SinkhornOT, get_coupling,
                                 solve_assignment, squared_distances)
from jaxgen.couplings.reflow import pair_sampler, reflow_coupling, reflow_couplings

__all__ = ["Coupling", "IndependentCoupling", "ExactOT", "SinkhornOT", "OnMesh", "get_coupling", "solve_assignment",
           "squared_distances", "reflow_couplings", "reflow_coupling", "pair_sampler"]
