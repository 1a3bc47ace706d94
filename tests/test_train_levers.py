"""Training-step levers against today's step: the chunked loss against the plain cross-entropy, the
scanned blocks against the loop, every remat policy against none (loss and gradients), the ahead-of-time
compiled step and its memory analysis, and the config checks."""

from __future__ import annotations

import collections
import re

import chex
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import rel_error, teacher_forced_logits, tiny_model, write_synthetic_token_dir

from lasadgen_jax import sharding, train, train_state
from lasadgen_jax.loss import chunked_cross_entropy, head_logits, next_token_loss
from lasadgen_jax.model_io import model_config_from
from lasadgen_jax.models.lasadgen import REMAT_POLICIES, LASADGen, ModelConfig
from lasadgen_jax.models.remat_names import ATTENTION_INPUT_NAME, GATED_PRODUCT_NAME, NORM_OUTPUT_NAME
from lasadgen_jax.ops import lasad


def plain_cross_entropy(features, kernel, targets, compute_dtype=None):
    return optax.softmax_cross_entropy_with_integer_labels(head_logits(features, kernel, compute_dtype), targets).mean()


@pytest.mark.parametrize("batch, n, chunk", [(2, 15, 4), (1, 16, 16), (3, 7, 100)],
                         ids=["n15-chunk4", "n16-one-chunk", "chunk-over-n"])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(batch, n, chunk):
    keys = jax.random.split(jax.random.PRNGKey(n * 10 + chunk), 3)
    features = jax.random.normal(keys[0], (batch, n, 32))
    kernel = 0.5 * jax.random.normal(keys[1], (32, 96))
    targets = jax.random.randint(keys[2], (batch, n), 0, 96)
    plain_loss, plain_grads = jax.jit(jax.value_and_grad(plain_cross_entropy, argnums=(0, 1)))(
        features, kernel, targets)
    chunked = lambda f, k, t: chunked_cross_entropy(f, k, t, chunk)
    loss, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(features, kernel, targets)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5, atol=0)
    for grad, plain_grad in zip(grads, plain_grads):
        chex.assert_trees_all_equal_shapes_and_dtypes(grad, plain_grad)
        assert rel_error(grad, plain_grad) < 1e-5


def test_chunked_cross_entropy_in_bfloat16_follows_the_bfloat16_head():
    """bf16 matmul inputs: the same bf16-rounded logits as the head, float32 logsumexp; the gradients
    differ from autodiff's only by where bf16 rounds (the chunked path accumulates in float32)."""
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    features = jax.random.normal(keys[0], (2, 15, 64))
    kernel = 0.3 * jax.random.normal(keys[1], (64, 128))
    targets = jax.random.randint(keys[2], (2, 15), 0, 128)
    plain = jax.value_and_grad(lambda f, k: plain_cross_entropy(f, k, targets, jnp.bfloat16), argnums=(0, 1))
    chunked = jax.value_and_grad(lambda f, k: chunked_cross_entropy(f, k, targets, 4, jnp.bfloat16), argnums=(0, 1))
    (plain_loss, plain_grads), (loss, grads) = jax.jit(plain)(features, kernel), jax.jit(chunked)(features, kernel)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5, atol=0)
    assert all(rel_error(g, p) < 2e-2 for g, p in zip(grads, plain_grads))


def test_chunked_cross_entropy_computes_its_gradients_in_one_pass_and_scales_them_by_the_cotangent():
    """The gradient's program has one scan over the chunks (the forward's: no chunk's logits are computed
    again), the loss alone has no gradient matmuls, and a cotangent other than 1 scales both gradients."""
    keys = jax.random.split(jax.random.PRNGKey(11), 3)
    features = jax.random.normal(keys[0], (1, 9, 16))
    kernel = 0.5 * jax.random.normal(keys[1], (16, 40))
    targets = jax.random.randint(keys[2], (1, 9), 0, 40)
    scaled = lambda loss_fn: lambda f, k: 2.5 * loss_fn(f, k) ** 2
    chunked = lambda f, k: chunked_cross_entropy(f, k, targets, 4)
    grads = jax.jit(jax.grad(scaled(chunked), argnums=(0, 1)))(features, kernel)
    plain_grads = jax.jit(jax.grad(scaled(lambda f, k: plain_cross_entropy(f, k, targets)), argnums=(0, 1)))(
        features, kernel)
    assert all(rel_error(g, p) < 1e-5 for g, p in zip(grads, plain_grads))
    grad_program = str(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(features, kernel))
    loss_program = str(jax.make_jaxpr(chunked)(features, kernel))
    assert grad_program.count("scan[") == 1 and grad_program.count("dot_general") == 3, grad_program
    assert loss_program.count("scan[") == 1 and loss_program.count("dot_general") == 1, loss_program


def loss_and_grads(model, tokens, labels):
    """(loss, parameter gradients) of next_token_loss in training mode (dropout on, streams from `key`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest):
        rest = jax.tree.map(jnp.asarray, rest)   # fresh RNG variables of this trace level, as in the trainer
        model = nnx.merge(graphdef, params, rest)
        model.train()
        return next_token_loss(model, tokens, labels)

    return jax.jit(jax.value_and_grad(loss_fn))(params, rest)


def assert_same_loss_and_grads(actual, expected, tolerance=1e-4):
    """Loss to 1e-5; each parameter's gradient to `tolerance` (norm-wise; float32 summation order moves the
    two per-head decay gradients by ~1e-5)."""
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=0)
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    assert len(leaves) == len(expected_leaves)
    for leaf, expected_leaf in zip(leaves, expected_leaves):
        assert rel_error(leaf, expected_leaf) < tolerance


def tiny_batch(model, batch=2, seed=3):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, model.config.num_tokens), 0, model.config.vocab_size)
    return tokens, jnp.arange(batch, dtype=jnp.int32) % (model.config.num_classes + 1)


# One small model in training mode (dropout on), a prefix of 2 and a 3x5 grid; the plain path as the baseline.
OPTIONS = dict(grid=(3, 5), num_prefix=2, resid_dropout=0.2)


@pytest.fixture(scope="module")
def baseline():
    """(tokens, labels, (loss, gradients) of the plain path: blocks in a loop, no remat, full logits)."""
    tokens, labels = tiny_batch(tiny_model("2d", **OPTIONS))
    return tokens, labels, loss_and_grads(tiny_model("2d", **OPTIONS), tokens, labels)


@pytest.mark.parametrize("levers", [dict(scan_layers=True), dict(remat="full"), dict(remat="dots"),
                                    dict(remat="dots_attention_inputs"), dict(remat="dots_matmul_inputs"),
                                    dict(loss_chunk_tokens=4),
                                    dict(scan_layers=True, remat="dots")],
                         ids=lambda levers: ",".join(f"{k}={v}" for k, v in levers.items()))
def test_levers_give_the_plain_loss_and_gradients(baseline, levers):
    """Every remat policy of REMAT_POLICIES, scanned blocks (each scanned block uses its own dropout
    stream, as in the loop) and the chunked loss (N=15 over chunks of 4) against the plain path."""
    tokens, labels, expected = baseline
    assert_same_loss_and_grads(loss_and_grads(tiny_model("2d", **OPTIONS, **levers), tokens, labels), expected)


def test_remat_policies_are_all_tested():
    assert set(REMAT_POLICIES) == {"none", "full", "dots", "dots_attention_inputs",
                                   "dots_matmul_inputs"}, "add the new policy to the tests"


def test_softmax_blocks_keeping_the_matmul_inputs_give_the_plain_loss_and_gradients():
    """The softmax block names its rotated q and k, its norms' outputs and its SwiGLU product for
    remat="dots_matmul_inputs" (the 2d block in the levers test above)."""
    tokens, labels = tiny_batch(tiny_model("softmax", **OPTIONS))
    expected = loss_and_grads(tiny_model("softmax", **OPTIONS), tokens, labels)
    levers = tiny_model("softmax", **OPTIONS, remat="dots_matmul_inputs")
    assert_same_loss_and_grads(loss_and_grads(levers, tokens, labels), expected)


def saved_names(attention: str, remat: str, capsys) -> collections.Counter:
    """How many values of each checkpoint_name the gradient of a 2-block model keeps from its forward."""
    config = ModelConfig(depth=2, num_heads=2, dim=32, vocab_size=64, num_classes=4, grid=(3, 5), attention=attention,
                         remat=remat)
    graphdef, state = nnx.split(LASADGen(config, rngs=nnx.Rngs(0, dropout=1)))
    tokens, labels = jnp.ones((2, 15), jnp.int32), jnp.zeros((2,), jnp.int32)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda state: nnx.merge(graphdef, state)(tokens, labels).mean(), state)
    return collections.Counter(re.findall(r"named '(\w+)'", capsys.readouterr().out))


@pytest.mark.parametrize("attention, inputs_per_block", [("2d", 3), ("softmax", 2)])
def test_remat_dots_attention_inputs_keeps_the_rotated_inputs(attention, inputs_per_block, capsys):
    """q and k after RoPE (and the LASAD kernel's padded k and v) are kept per block, so the backward
    does not rotate (or pad) them again; "dots" keeps none of them."""
    assert saved_names(attention, "dots_attention_inputs", capsys)[ATTENTION_INPUT_NAME] == 2 * inputs_per_block
    assert saved_names(attention, "dots", capsys)[ATTENTION_INPUT_NAME] == 0


@pytest.mark.parametrize("attention, inputs_per_block, products_per_block", [("2d", 3, 2), ("softmax", 2, 1)])
def test_remat_dots_matmul_inputs_keeps_every_projection_input(attention, inputs_per_block, products_per_block,
                                                               capsys):
    """Beyond the attention inputs, each block's two norm outputs and its gated products (the SwiGLU's, and
    the LASAD block's before its output projection); the policy that keeps only the attention inputs keeps
    none of them."""
    names = saved_names(attention, "dots_matmul_inputs", capsys)
    assert (names[ATTENTION_INPUT_NAME], names[NORM_OUTPUT_NAME], names[GATED_PRODUCT_NAME]) == (
        2 * inputs_per_block, 2 * 2, 2 * products_per_block), names
    names = saved_names(attention, "dots_attention_inputs", capsys)
    assert names[NORM_OUTPUT_NAME] == names[GATED_PRODUCT_NAME] == 0, names


def forward_kernel_calls(remat: str, monkeypatch) -> int:
    """Calls of the parallel-form forward kernel in the gradient of a 2-block `2d` model, lowered for
    CUDA through jax.export on the CPU (the kernels' names survive there; interpret mode has none)."""
    def gpu_kernel(q, k, v, *, impl, **kwargs):
        assert impl == "pallas_parallel", impl
        return lasad.lasad_attention_parallel(q, k, v, backend="gpu", **kwargs)

    monkeypatch.setattr(lasad, "lasad_attention", gpu_kernel)
    config = ModelConfig(depth=2, num_heads=2, dim=32, vocab_size=64, num_classes=4, grid=(3, 5), attention="2d",
                         lasad_impl="pallas_parallel", dtype="bfloat16", remat=remat)
    graphdef, state = nnx.split(LASADGen(config, rngs=nnx.Rngs(0, dropout=1)))
    tokens, labels = jnp.zeros((2, 15), jnp.int32), jnp.zeros((2,), jnp.int32)

    def gradient(state):
        return nnx.grad(lambda model: model(tokens, labels).mean())(nnx.merge(graphdef, state))

    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(jax.jit(gradient), platforms=["cuda"],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(state)
    return module.mlir_module().count('name = "lasad_parallel_2d"')


def test_remat_dots_keeps_the_lasad_output_so_the_backward_does_not_rerun_the_forward_kernel(monkeypatch):
    """The op's backward reads only its inputs: with its output kept, "dots" runs the forward kernel once
    per block; "full" runs it again in the backward."""
    assert forward_kernel_calls("dots", monkeypatch) == 2
    assert forward_kernel_calls("full", monkeypatch) == 4


def cudnn_forward_calls(remat: str, monkeypatch) -> int:
    """Calls of cuDNN's attention forward in the gradient of a 2-block softmax model, lowered for CUDA through
    jax.export on the CPU (jax checks for cuDNN and the GPU's compute capability when it traces; both are
    set to a Hopper GPU's here)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused_attention_stablehlo, "check_compute_capability", lambda capability: True)
    config = ModelConfig(depth=2, num_heads=2, dim=128, vocab_size=64, num_classes=4, grid=(4, 4),
                         attention="softmax", softmax_impl="cudnn", dtype="bfloat16", remat=remat)
    graphdef, state = nnx.split(LASADGen(config, rngs=nnx.Rngs(0, dropout=1)))
    tokens, labels = jnp.zeros((2, 16), jnp.int32), jnp.zeros((2,), jnp.int32)

    def gradient(state):
        return nnx.grad(lambda model: model(tokens, labels).mean())(nnx.merge(graphdef, state))

    forward, backward = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
    checks = [jax.export.DisabledSafetyCheck.custom_call(target) for target in (forward, backward)]
    module = jax.export.export(jax.jit(gradient), platforms=["cuda"], disabled_checks=checks)(state)
    text = module.mlir_module()
    assert text.count(f"custom_call @{backward}(") == 2
    return text.count(f"custom_call @{forward}(")


def test_remat_dots_keeps_cudnn_attention_outputs_so_the_backward_does_not_rerun_its_forward(monkeypatch):
    """cuDNN's backward reads the forward's output and softmax statistics: "dots" keeps them (matched by
    the forward's primitive) and runs the forward once per block; "full" runs it again in the backward."""
    assert cudnn_forward_calls("dots", monkeypatch) == 2
    assert cudnn_forward_calls("full", monkeypatch) == 4


def test_scanned_softmax_blocks_with_remat_and_chunked_loss_give_the_loop_loss_and_gradients():
    tokens, labels = tiny_batch(tiny_model("softmax", **OPTIONS))
    looped = loss_and_grads(tiny_model("softmax", **OPTIONS), tokens, labels)
    levered = tiny_model("softmax", scan_layers=True, remat="full", loss_chunk_tokens=4, **OPTIONS)
    assert_same_loss_and_grads(loss_and_grads(levered, tokens, labels), looped)


def test_scanned_blocks_write_back_the_dropout_streams_and_leave_decoding_alone():
    """Two training calls draw new dropout masks in both layouts alike; decoding (never scanned) still
    gives the parallel logits."""
    options = dict(grid=(3, 4), resid_dropout=0.3)
    looped, scanned = tiny_model("2d", **options), tiny_model("2d", scan_layers=True, **options)
    tokens, labels = tiny_batch(looped)
    forward = nnx.jit(lambda model, tokens, labels: model(tokens, labels))
    looped.train(), scanned.train()
    first = forward(scanned, tokens, labels)
    assert rel_error(first, forward(looped, tokens, labels)) < 1e-5
    second = forward(scanned, tokens, labels)
    assert rel_error(second, forward(looped, tokens, labels)) < 1e-5 and rel_error(second, first) > 1e-3
    scanned.eval()
    assert rel_error(teacher_forced_logits(scanned, tokens, labels), forward(scanned, tokens, labels)) < 1e-4


@pytest.mark.parametrize("overrides, match", [
    (dict(loss_chunk_tokens=-1), "loss_chunk_tokens must be an int >= 0"),
    (dict(loss_chunk_tokens=2.5), "loss_chunk_tokens must be an int >= 0"),
    (dict(loss_chunk_tokens=True), "loss_chunk_tokens must be an int >= 0"),
    (dict(scan_layers="yes"), "scan_layers must be a bool"),
])
def test_bad_lever_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(dim=32, num_heads=2, **overrides)


def test_compiled_step_with_levers_matches_the_plain_step(tmp_path):
    """The trainer's step compiled ahead of time (once, with XLA's memory analysis) runs; with chunked
    loss, scanned blocks and remat it gives the plain step's loss, gradient norm and Adam moment."""
    from train_runs import tiny_config

    tokens_dir = write_synthetic_token_dir(str(tmp_path / "tokens"))
    results = []
    for levers in [{}, dict(loss_chunk_tokens=5, scan_layers=True, remat="dots")]:
        config = tiny_config(tokens_dir, 2)
        config.model.update(depth=1, **levers)   # compile time is most of this test
        model_config = model_config_from(config)
        mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
        setup = train_state.setup_training(config, model_config, mesh, config.num_steps)
        setup.compile_step(config.batch_size, model_config.num_tokens)
        memory = setup.train_step.memory_analysis()
        assert memory is None or memory["argument"] > 0 and memory["peak_estimate"] >= memory["temp"]
        assert setup.train_step.compile_seconds > 0
        example = next(train.open_data(config, tokens_dir, model_config))
        tokens, labels = train.global_batch(example, mesh)
        state = setup.initial_state(model_config, config.seed)
        for _ in range(2):   # the head starts at zero: step 2's gradients reach every parameter
            state, metrics = setup.train_step(state, tokens, labels)
        results.append((metrics, state["opt_state"][1][0].mu))
    (plain, plain_mu), (levered, levered_mu) = results
    np.testing.assert_allclose(levered["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(levered["grad_norm"], plain["grad_norm"], rtol=1e-4)
    chex.assert_trees_all_close(levered_mu, plain_mu, rtol=1e-3, atol=1e-7)


def test_remat_memory_counts_what_dots_matmul_inputs_keeps_beyond_the_attention_inputs():
    """benchmarks/remat_memory.py (abstract trace of the B model's loss gradient): the two policies differ by
    exactly each block's two bf16 norm outputs, its SwiGLU product and the LASAD block's gated product."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import remat_memory

    kept = {remat: remat_memory.policy_bytes("B", "2d", 4, 3, remat, 4, "auto")
            for remat in ("dots_attention_inputs", "dots_matmul_inputs")}
    config = remat_memory.model_config("B")
    positions, bf16 = config.num_prefix + 4 * 4 - 1, 2
    per_block = 3 * positions * bf16
    assert kept["dots_matmul_inputs"][NORM_OUTPUT_NAME] == config.depth * 2 * per_block * config.dim
    assert kept["dots_matmul_inputs"][GATED_PRODUCT_NAME] == config.depth * per_block * (config.ffn_hidden + config.dim)
    assert kept["dots_attention_inputs"][NORM_OUTPUT_NAME] == kept["dots_attention_inputs"][GATED_PRODUCT_NAME] == 0
    assert sum(kept["dots_matmul_inputs"].values()) - sum(kept["dots_attention_inputs"].values()) == (
        kept["dots_matmul_inputs"][NORM_OUTPUT_NAME] + kept["dots_matmul_inputs"][GATED_PRODUCT_NAME])
    with pytest.raises(ValueError, match="unknown dtype 'c64'"):
        remat_memory.residual_bytes("c64[2,3] output of mul from x.py:1")
