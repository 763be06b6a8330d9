"""Pallas GPU kernels; each file carries a plain-JAX reference() beside its kernel."""
