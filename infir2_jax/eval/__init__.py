"""Evaluation in one command: evalscope in service mode against SGLang, our own server
(`python -m infir2_jax.serve`) or a URL (`python -m infir2_jax.eval`)."""
