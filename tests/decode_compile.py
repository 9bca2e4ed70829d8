"""The decode loop compiled for an H100 on the CPU (no GPU): its temporary memory at two cache
lengths, as JSON on stdout. A buffer that grows with the cache (a copy of it, or of a layer's
slice) shows as a difference. Run by tests/test_gpu_compile.py (needs the CUDA plugin):

    JAX_PLATFORMS=cpu python tests/decode_compile.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from infir2_jax.gpu_target import COMPILE_FLAGS  # noqa: E402  (imports no JAX)

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + COMPILE_FLAGS

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from infir2_jax.generate import Engine  # noqa: E402
from infir2_jax.generate.sampling import TokenFilter  # noqa: E402
from infir2_jax.gpu_target import gpu_devices  # noqa: E402
from infir2_jax.model import Qwen2, preset  # noqa: E402

SLOTS = 8


def main() -> None:
    cfg = preset("tiny").replace(dtype="bfloat16", param_dtype="bfloat16")
    engine = Engine.from_model(Qwen2(cfg, rngs=nnx.Rngs(0)), slots=SLOTS)
    gpu = SingleDeviceSharding(gpu_devices("h100", 1)[0])
    out = {}
    for length in (1024, 4096):
        cache, slots = jax.eval_shape(lambda n=length: engine._empty_state(n))
        args = (engine.params, cache, slots, jnp.array([1], jnp.int32), np.ones(SLOTS, bool), True)
        args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a), sharding=gpu), args
        )
        compiled = engine._decode.lower(*args, how=TokenFilter(1.0, 0, 1.0, 0.0), steps=8).compile()
        out[length] = {
            "cache_bytes": 2 * cache.k.size * cache.k.dtype.itemsize,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            # XLA:GPU's scheduling annotations: the module was compiled for the GPU.
            "xla_gpu": "operation_queue_id" in compiled.as_text(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
