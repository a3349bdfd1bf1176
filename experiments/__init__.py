"""Research experiments: sweeps over the demo's distillation (see experiments/README.md)."""
