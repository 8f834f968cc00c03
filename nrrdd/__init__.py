"""nrrdd: NRR-DD dataset distillation."""
__version__ = "0.1.0"
