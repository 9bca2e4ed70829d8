# Environment for infir2-jax on Hopper (H100/H200) nodes; sourced by train.sbatch.
# Why each setting is here is in launch/README.md.

# XLA: overlap collectives with compute, cuBLASLt for every GEMM (FP8 included), pipelined
# FSDP/TP collectives inside the scanned layers, and larger collective combining.
export XLA_FLAGS="${XLA_FLAGS:-} \
  --xla_gpu_enable_latency_hiding_scheduler=true \
  --xla_gpu_enable_triton_gemm=false \
  --xla_gpu_enable_pipelined_all_gather=true \
  --xla_gpu_enable_pipelined_reduce_scatter=true \
  --xla_gpu_enable_pipelined_all_reduce=true \
  --xla_gpu_enable_while_loop_double_buffering=true \
  --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728"

# Memory: let JAX's allocator take 95% of each GPU up front (default 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
# NCCL: fail fast and say why instead of hanging on a dead peer.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Quieter TF/XLA C++ logs in the job output.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
