"""alphaq-gguf: calibration-free heavy-tail-aware bit allocation for MoE GGUF quantisation."""

__version__ = "0.1.0"
