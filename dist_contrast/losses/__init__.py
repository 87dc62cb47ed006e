"""Objectives: pure functions plus thin nn.Module wrappers. Distributed-aware, no model code."""

from dist_contrast.losses.ntxent import NTXentLoss, nt_xent

__all__ = ["NTXentLoss", "nt_xent"]
