"""moetool: prepare Mixture-of-Experts checkpoints for fast GPU inference, offline and once."""

__version__ = "0.1.0"
