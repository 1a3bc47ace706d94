"""The LASAD Pallas kernels, one module per kernel family and backend.

backend.py      backend names, the default backend, head-dim padding, what every family shares
chunk.py        the chunk family behind impl="pallas": configuration, custom_vjp, entry
                (bodies: chunk_gpu.py Triton, chunk_mgpu.py Mosaic GPU, chunk_tpu.py Mosaic TPU;
                chunk_refs.py their ref helpers, chunk_config.py BlockSizes and ChunkOptions;
                sweep_2d.py the opt-in `2d` sweep backward)
parallel_form.py  the fused parallel-form kernel behind impl="pallas_parallel"

This package imports none of them: import the module you need.
"""
