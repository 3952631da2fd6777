"""Pallas GPU kernels with pure-XLA references and one dispatcher.  Imports nothing of iva_jax."""
