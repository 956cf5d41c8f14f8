"""Pallas kernels for jaxserve: attention over the paged KV cache and quantised matmuls, each
file a kernel (TPU Mosaic and GPU Triton) beside a pure-jnp reference with the same signature
and an XLA formulation for CPU (impl "xla"). Use `pallas_kernels.dispatch` for the backend
choice. Never imports jaxserve."""
