"""stas-jax: STAS (spatio-temporal adaptive computation time) for spiking transformers in JAX."""
