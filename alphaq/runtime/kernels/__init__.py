"""Kernels that run AlphaQ's GGUF weights directly from their raw ggml blocks.

Modules, one concern each:

* ``layouts``   -- block sizes and byte layouts per ggml type; the grouped (expert-granular) MoE format
* ``torch_ref`` -- plain torch reference: gguf-py dequantises, torch multiplies (CPU runtime, test oracle)
* ``dequant``   -- Triton dequantisation, bit-exact with gguf-py
* ``matmul``    -- Triton fused dequant + GEMV (decode) and GEMM (prefill)
* ``moe``       -- Triton grouped MoE projection over the type groups of one projection

Triton is an optional extra (``pip install '.[gpu]'``). ``layouts`` and ``torch_ref`` never import it;
``dequant``, ``matmul`` and ``moe`` do, so import them explicitly (``from alphaq.runtime.kernels import matmul``).
To run them on CPU (Triton's interpreter; used by the tests), set ``TRITON_INTERPRET=1`` before
anything imports Triton and keep it set: Triton reads it at import and at every launch.
See docs/KERNELS.md.
"""
