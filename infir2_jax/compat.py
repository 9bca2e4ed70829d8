"""What differs between the JAX releases we support, asked in one place: jax 0.10.2 on Python
3.11 (requirements.txt) and jax 0.12 on Python 3.12-3.13 (requirements-jax012.txt). Code
elsewhere uses the APIs both releases share and asks here for the rest."""

from __future__ import annotations

import importlib.util

# jax's CUDA plugins by CUDA major version, newest first: the CUDA 12 plugin stops at jax
# 0.12.0.1, so compile-only GPU targets on newer jax come from the CUDA 13 one.
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def cuda_plugin() -> str | None:
    """The module name of the installed CUDA plugin of jax, or None without one."""
    for name in CUDA_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def scan_num_consts(params: dict) -> int:
    """How many leading operands of a `scan` equation (its `params`) are loop constants: a
    `num_consts` count up to jax 0.11; since jax 0.12 an `ft_in` tree of (consts, carry, xs)."""
    if "num_consts" in params:
        return params["num_consts"]
    consts, _, _ = params["ft_in"].unpack()
    return len(consts)
