"""Programs and helpers on top of training: evaluation reports, seed studies, plots, timing,
PyTorch checkpoint conversion and loading a trained run for inference."""
