"""Random PyTorch checkpoints in LlamaGen's layouts, for the README walkthrough's converter steps.

    python3 tests/walkthrough_checkpoints.py vq16 vq_ds16_c2i.pt   # VQ-16 (its full size, 72M params)
    python3 tests/walkthrough_checkpoints.py gpt c2i_L_256.pt      # a tiny c2i GPT: depth 2, dim 64, 4 heads

Names and shapes are LlamaGen's (the VQ's from the converter's own name map, conv kernels [out, in, kh, kw];
the GPT's as tests/test_convert_llamagen.py writes them); the values are random: the walkthrough checks
that the README's commands run, the converters' tests check the numbers. Needs torch (the `torch` extra).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

GPT_DEPTH, GPT_DIM, GPT_VOCAB, GPT_CLASSES = 2, 64, 16384, 1000   # LlamaGen's vocabulary and classes


def vq16_state_dict() -> dict:
    from lasadgen_jax.tokenizer.architecture import VQ16
    from lasadgen_jax.tokenizer.checkpoint import param_shapes
    from lasadgen_jax.tokenizer.convert import torch_key
    from lasadgen_jax.tokenizer.model import abstract_vq_model

    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in param_shapes(abstract_vq_model(VQ16)).items():
        if name.endswith("/kernel"):   # Flax [kh, kw, in, out] -> PyTorch [out, in, kh, kw]
            shape = (shape[3], shape[2], shape[0], shape[1])
        state[torch_key(name)] = 0.02 * torch.randn(*shape, generator=generator)
    return state


def gpt_state_dict() -> dict:
    generator = torch.Generator().manual_seed(0)
    normal = lambda *shape: 0.02 * torch.randn(*shape, generator=generator)
    hidden = int(2 * 4 * GPT_DIM / 3)
    hidden += -hidden % 256   # LlamaGen's SwiGLU width: 2/3 * 4 dim, rounded up to a multiple of 256
    state = {"tok_embeddings.weight": normal(GPT_VOCAB, GPT_DIM),
             "cls_embedding.embedding_table.weight": normal(GPT_CLASSES + 1, GPT_DIM),
             "norm.weight": torch.ones(GPT_DIM), "output.weight": normal(GPT_VOCAB, GPT_DIM)}
    for i in range(GPT_DEPTH):
        state.update({
            f"layers.{i}.attention.wqkv.weight": normal(3 * GPT_DIM, GPT_DIM),
            f"layers.{i}.attention.wo.weight": normal(GPT_DIM, GPT_DIM),
            f"layers.{i}.feed_forward.w1.weight": normal(hidden, GPT_DIM),
            f"layers.{i}.feed_forward.w3.weight": normal(hidden, GPT_DIM),
            f"layers.{i}.feed_forward.w2.weight": normal(GPT_DIM, hidden),
            f"layers.{i}.attention_norm.weight": torch.ones(GPT_DIM),
            f"layers.{i}.ffn_norm.weight": torch.ones(GPT_DIM),
        })
    return state


def main(argv: list[str]) -> int:
    makers = {"vq16": vq16_state_dict, "gpt": gpt_state_dict}
    if len(argv) != 3 or argv[1] not in makers:
        print(f"usage: {argv[0]} {{{'|'.join(makers)}}} OUT.pt", file=sys.stderr)
        return 2
    state = makers[argv[1]]()
    torch.save({"model": state}, argv[2])
    count = sum(int(np.prod(tensor.shape)) for tensor in state.values())
    print(f"wrote {argv[2]}: a random {argv[1]} checkpoint in LlamaGen's layout ({count / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
