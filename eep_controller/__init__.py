"""eep controller: the control plane for elastic expert parallelism."""

__version__ = "0.1.0"
