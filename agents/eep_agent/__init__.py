"""eep agent: the per-node daemon and the reference MoE worker runtime."""

__version__ = "0.1.0"
