"""What the training remat policies (lasadgen.REMAT_POLICIES) may keep beyond matmul outputs.

Values are marked with `jax.ad_checkpoint.checkpoint_name`; cuDNN's attention forward is matched by
its primitive, since its softmax statistics never leave jax's own function.
"""

KEEP_MASK_NAME = "dropout_keep_mask"    # dropout's keep masks, 1 byte per element (dropout.py)
LASAD_OUTPUT_NAME = "lasad_output"      # the LASAD op's output: its backward reads only the op's inputs
ATTENTION_INPUT_NAME = "attention_input"  # q and k after RoPE, and the LASAD op's cell values
NORM_OUTPUT_NAME = "block_norm_output"  # a block's two RMSNorm outputs in the compute dtype: the projections' input
GATED_PRODUCT_NAME = "gated_product"    # an output projection's gated input: silu(w1 x) * w3 x in the SwiGLU,
                                        # the normed LASAD output times silu(gate) in the LASAD block
# The primitive that runs cuDNN's forward kernel inside jax.nn.dot_product_attention(implementation=
# "cudnn"); its outputs are the attention output and the softmax statistics the backward reads.
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"
