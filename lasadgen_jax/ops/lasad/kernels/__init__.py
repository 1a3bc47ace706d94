"""The LASAD Pallas kernels, one module per kernel family and backend.

backend.py      backend names, the default backend, head-dim padding, what every family shares
chunk.py        the chunk family behind impl="pallas": configuration, custom_vjp, entry
                (bodies: chunk_gpu.py Triton, chunk_mgpu.py Mosaic GPU, chunk_tpu.py Mosaic TPU;
                chunk_refs.py their ref helpers, chunk_config.py BlockSizes and ChunkOptions;
                sweep_2d.py the opt-in `2d` sweep backward)
parallel_form.py  the fused parallel-form kernel behind impl="pallas_parallel"
linear_2d.py    the linear-time exact `2d` kernel behind impl="pallas_linear": tiles, custom_vjp,
                entry (linear_2d_chunk.py the arithmetic of one row chunk; bodies:
                linear_2d_gpu.py Triton, linear_2d_tpu.py Mosaic TPU)
row_blocks.py   `2d` over blocks of rows behind impl="pallas_row_blocks": the parallel form inside
                a block, the Triton column sweeps across blocks, their custom_vjp (GPU)
decode.py       the fused decode step behind decode_impl="pallas" (Triton and Mosaic TPU bodies)

This package imports none of them: import the module you need.
"""
