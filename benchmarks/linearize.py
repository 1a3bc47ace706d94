"""Linearization on the attention ablation: does a softmax model turned into `2d` LASAD and fine-tuned
briefly match `2d` trained from scratch? And may `2d` decode with bfloat16 states?

    # the bundle of benchmarks/ablation.py (CPU: its docstring's two commands), then on the GPU:
    python3 benchmarks/linearize.py run --bundle .ablation/bundle --results L.json [--seeds 0,1]
    python3 benchmarks/linearize.py report --results L.json

Arms, per seed, on the data and model of configs/ablation.py (the same initialisation seed and batch
order in every arm):
- `softmax`: softmax attention trained --steps N (the ablation's 600);
- `linearized`: that model's parameters copied into a `2d` model (lasadgen_jax/linearize.py: the gate,
  output norm and decays fresh), then --finetune_steps M with configs/linearize.py:base=ablation (the
  first --frozen_steps K updates move only the attention), on batches N .. N+M-1 of the seed's order;
- `2d_scratch`: `2d` trained from scratch for N + M steps (the same batches as softmax then linearized);
- `state_precision`: the `2d_scratch` model decoding with bfloat16 instead of float32 states: greedy
  samples (temperature 0) of the same labels, and the temperature-1 FID samples with the same keys:
  the fraction of tokens and of whole images that agree, and FID at CFG 1 of each.

Each arm reports test NLL (bits/token), FID at CFG 1 of --fid_samples samples (and at CFG 2 with
--fid_cfg2) against the 10k test images, and its accelerator seconds (training with compilation,
evaluation): `linearized` also counts the softmax training it started from. Arms already in
--results are skipped; trained parameters are kept in --scratch, so a later call on the same
machine continues without retraining (else a missing source is retrained, not re-recorded). No arm
starts that would end after --deadline seconds; progress lines carry the elapsed time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import ablation
import numpy as np

from lasadgen_jax.config_files import load_config

ARMS = ("softmax", "linearized", "2d_scratch", "state_precision")
FIRST_ESTIMATES = {"softmax": 120.0, "linearized": 100.0, "2d_scratch": 200.0, "state_precision": 90.0}


def arm_config(arm: str, args):
    """The training config of an arm (None for state_precision, which trains nothing)."""
    if arm == "state_precision":
        return None
    if arm == "linearized":
        config = load_config(os.path.join(ablation.REPO, "configs", "linearize.py") + ":base=ablation,attention=2d")
    else:
        config = ablation.variant_config("softmax" if arm == "softmax" else "2d")
    config.unlock()
    if args.smoke:
        ablation.shrink_for_smoke(config)
    config.num_steps = {"softmax": args.steps, "linearized": args.finetune_steps,
                        "2d_scratch": args.steps + args.finetune_steps}[arm]
    if arm == "linearized":
        config.freeze_non_attention_steps = args.frozen_steps
        if args.finetune_lr is not None:
            config.optimizer.learning_rate = args.finetune_lr
        config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, config.num_steps)
    config.ablation.update(fid_samples=args.fid_samples, log_every=max(1, min(config.ablation.log_every,
                                                                              config.num_steps // 4)))
    return config


# ============================================================================= models and parameters


def model_of(model_config, params):
    """An eval-mode LASADGen of model_config holding `params` (a pure dict)."""
    import jax
    from flax import nnx

    from lasadgen_jax.train_state import abstract_model, seeded_rng_state

    graphdef, _, rng_state = abstract_model(model_config)
    rng_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rng_state)
    model = nnx.merge(graphdef, params, seeded_rng_state(rng_state, jax.random.key(0)))
    model.eval()
    return model


def save_params_npz(path: str, params) -> None:
    import jax

    from lasadgen_jax.linearize import named_leaves

    np.savez(path + ".tmp.npz", **{name: np.asarray(x) for name, x in named_leaves(jax.device_get(params)).items()})
    os.replace(path + ".tmp.npz", path)


def load_params_npz(path: str, model_config) -> dict:
    import jax
    import jax.numpy as jnp

    from lasadgen_jax.linearize import param_name
    from lasadgen_jax.train_state import abstract_model

    with np.load(path, allow_pickle=False) as npz:
        return jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(npz[param_name(p)]),
                                                abstract_model(model_config)[1])


class TrainedParams:
    """Trained parameters by (arm, seed): in memory, else in the scratch directory, else trained again."""

    def __init__(self, scratch: str):
        self.scratch, self.memory = scratch, {}

    def path(self, arm: str, seed: int) -> str:
        return os.path.join(self.scratch, f"params_{arm}_seed{seed}.npz")

    def keep(self, arm: str, seed: int, params) -> None:
        self.memory[(arm, seed)] = params
        save_params_npz(self.path(arm, seed), params)

    def get(self, arm: str, seed: int, model_config, retrain):
        if (arm, seed) in self.memory:
            return self.memory[(arm, seed)]
        if os.path.exists(self.path(arm, seed)):
            return load_params_npz(self.path(arm, seed), model_config)
        params = retrain()
        self.keep(arm, seed, params)
        return params


# ============================================================================= sampling and scores


@dataclasses.dataclass
class Scorer:
    data: ablation.Bundle
    extractor: object
    reference: object
    sample_batch: int

    def tokens(self, model, count: int, key, temperature: float = 1.0, cfg_scale: float = 1.0) -> np.ndarray:
        """int32 [count, h, w]; labels cycle through the classes; batches of sample_batch, keys split from `key`."""
        from lasadgen_jax.sample import SamplingConfig, generate_in_batches

        labels = (np.arange(count) % model.config.num_classes).astype(np.int32)
        sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature)
        return generate_in_batches(model, labels, key, sampling, self.sample_batch)

    def fid(self, tokens: np.ndarray) -> float:
        from lasadgen_jax.sample import decode_to_uint8

        images = decode_to_uint8(self.data.tokenizer, tokens, self.sample_batch)
        return ablation.fid_of(images, self.extractor, self.reference)


def fid_draw_key(seed: int, cfg_scale: float):
    """The key of an arm's FID samples: the same in every arm of a seed (paired samples)."""
    import jax

    return jax.random.fold_in(jax.random.key(1000 + seed), int(round(10 * cfg_scale)))


def score_model(model, scorer: Scorer, args, seed: int, log) -> tuple[dict, np.ndarray]:
    """Test NLL, FID at CFG 1 (and 2); also the CFG-1 tokens (for state_precision's pairing)."""
    started = time.perf_counter()
    nll = ablation.nll_bits_per_token(model, scorer.data, args.eval_batch)
    log(f"  test NLL {nll:.4f} bits/token ({time.perf_counter() - started:.0f}s)")
    result = {"test_nll_bits_per_token": nll}
    tokens_cfg1 = None
    for scale in (1.0, 2.0) if args.fid_cfg2 else (1.0,):
        started = time.perf_counter()
        scorer.tokens(model, scorer.sample_batch, fid_draw_key(seed, scale), cfg_scale=scale)   # compiles
        compiled = time.perf_counter()
        tokens = scorer.tokens(model, args.fid_samples, fid_draw_key(seed, scale), cfg_scale=scale)
        sampled = time.perf_counter()
        fid = scorer.fid(tokens)
        name = f"cfg{scale:g}"
        result.update({f"fid_{name}": fid, f"sampling_images_per_second_{name}": round(args.fid_samples /
                                                                                     (sampled - compiled), 1)})
        log(f"  FID {name} ({args.fid_samples} samples): {fid:.2f}; sampling compile {compiled - started:.0f}s, "
            f"{args.fid_samples / (sampled - compiled):.0f} images/s, scoring {time.perf_counter() - sampled:.0f}s")
        if scale == 1.0:
            tokens_cfg1 = tokens
    return result, tokens_cfg1


# ============================================================================= arms


def train_arm(arm: str, seed: int, args, data, mesh, trained: TrainedParams, log, initial_params=None):
    """(params, setup, stats) of an arm's training; the parameters are kept (memory and scratch)."""
    config = arm_config(arm, args)
    config.seed = seed
    first_batch = args.steps if arm == "linearized" else 0
    params, setup, stats = ablation.train_variant(config, data, mesh, log, initial_params=initial_params,
                                                  first_batch=first_batch)
    trained.keep(arm, seed, params)
    return params, config, stats


def source_softmax(seed: int, args, data, mesh, trained: TrainedParams, log):
    from lasadgen_jax.model_io import model_config_from

    def retrain():
        log(f"  softmax seed {seed}: not in memory or {args.scratch}; training it again (not re-recorded)")
        return train_arm("softmax", seed, args, data, mesh, trained, log)[0]

    config = arm_config("softmax", args)
    return trained.get("softmax", seed, model_config_from(config), retrain)


def run_training_arm(arm: str, seed: int, args, data, mesh, scorer, trained, results, log) -> dict:
    import jax

    from lasadgen_jax import linearize
    from lasadgen_jax.model_io import model_config_from
    from lasadgen_jax.train_state import init_params

    extra, initial_params = {}, None
    if arm == "linearized":
        source = source_softmax(seed, args, data, mesh, trained, log)
        config = arm_config(arm, args)
        model_config = model_config_from(config)
        initial_params, transfer = linearize.transfer_params(jax.device_get(source), init_params(model_config, seed),
                                                             f"softmax seed {seed}")
        log(f"  {transfer.summary()}")
        start_nll = ablation.nll_bits_per_token(model_of(model_config, initial_params), data, args.eval_batch)
        log(f"  test NLL right after linearization, before fine-tuning: {start_nll:.4f} bits/token")
        softmax_runs = [r for r in results if r["arm"] == "softmax" and r["seed"] == seed]
        extra = dict(test_nll_before_finetuning=start_nll, copied=len(transfer.copied), fresh=len(transfer.fresh),
                     source_train_seconds=softmax_runs[0]["train_seconds_with_compile"] if softmax_runs else None)
    params, config, stats = train_arm(arm, seed, args, data, mesh, trained, log, initial_params)
    model_config = model_config_from(config)
    scores, tokens_cfg1 = score_model(model_of(model_config, params), scorer, args, seed, log)
    if arm == "2d_scratch":
        np.save(os.path.join(args.scratch, f"tokens_cfg1_2d_scratch_seed{seed}.npy"), tokens_cfg1)
    return dict(steps=config.num_steps, frozen_steps=config.freeze_non_attention_steps,
                learning_rate=config.optimizer.learning_rate, batch_size=config.batch_size,
                train_seconds_with_compile=round(stats["compile_seconds"] + stats["train_seconds"], 1),
                lasad_impl=ablation.resolved_impl(config), **stats, **extra, **scores)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    same = a.reshape(len(a), -1) == b.reshape(len(b), -1)
    return {"token_agreement": float(same.mean()), "image_agreement": float(same.all(axis=1).mean()),
            "images": len(a)}


def run_state_precision(seed: int, args, data, mesh, scorer: Scorer, trained: TrainedParams, results, log) -> dict:
    """2d_scratch decoding with float32 vs bfloat16 states: greedy and temperature-1 samples of the same
    labels and keys; FID at CFG 1 of the bfloat16 samples next to the float32 ones'."""
    import jax

    from lasadgen_jax.model_io import model_config_from

    config = arm_config("2d_scratch", args)
    config.seed = seed
    float32_config = dataclasses.replace(model_config_from(config), decode_state_dtype="float32")
    bfloat16_config = dataclasses.replace(float32_config, decode_state_dtype="bfloat16")

    def retrain():
        log(f"  2d_scratch seed {seed}: not in memory or {args.scratch}; training it again (not re-recorded)")
        return train_arm("2d_scratch", seed, args, data, mesh, trained, log)[0]

    params = trained.get("2d_scratch", seed, float32_config, retrain)
    float32, bfloat16 = model_of(float32_config, params), model_of(bfloat16_config, params)
    greedy_key = jax.random.key(7)   # unused by greedy decoding; the same for both
    count = min(scorer.sample_batch, args.fid_samples)
    greedy = agreement(scorer.tokens(float32, count, greedy_key, temperature=0.0),
                       scorer.tokens(bfloat16, count, greedy_key, temperature=0.0))
    log(f"  greedy, {count} labels: tokens agree {greedy['token_agreement']:.4f}, whole images "
        f"{greedy['image_agreement']:.4f} (greedy decoding is one image per class)")

    tokens_path = os.path.join(args.scratch, f"tokens_cfg1_2d_scratch_seed{seed}.npy")
    scorer.tokens(bfloat16, count, fid_draw_key(seed, 1.0))   # compiles
    started = time.perf_counter()
    tokens_bfloat16 = scorer.tokens(bfloat16, args.fid_samples, fid_draw_key(seed, 1.0))
    images_per_second = args.fid_samples / (time.perf_counter() - started)
    if os.path.exists(tokens_path):
        tokens_float32 = np.load(tokens_path, allow_pickle=False)
    else:
        tokens_float32 = scorer.tokens(float32, args.fid_samples, fid_draw_key(seed, 1.0))
    sampled = agreement(tokens_float32, tokens_bfloat16)
    fid_bfloat16 = scorer.fid(tokens_bfloat16)
    scratch_runs = [r for r in results if r["arm"] == "2d_scratch" and r["seed"] == seed]
    fid_float32 = scratch_runs[0]["fid_cfg1"] if scratch_runs else scorer.fid(tokens_float32)
    log(f"  temperature 1, CFG 1, the same keys ({args.fid_samples}): tokens agree {sampled['token_agreement']:.4f}, "
        f"whole images {sampled['image_agreement']:.4f}; FID float32 {fid_float32:.2f}, bfloat16 {fid_bfloat16:.2f} "
        f"({images_per_second:.0f} images/s with bfloat16 states)")
    return dict(greedy=greedy, sampled_cfg1=sampled, fid_cfg1_float32=fid_float32, fid_cfg1_bfloat16=fid_bfloat16,
                sampling_images_per_second_bfloat16=round(images_per_second, 1))


# ============================================================================= the run


def run(args) -> None:
    import flax
    import jax

    from lasadgen_jax import sharding
    from lasadgen_jax.eval.features import FeatureExtractor
    from lasadgen_jax.eval.reference import reference_from_features

    started = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - started:6.0f}s] {text}", flush=True)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arms {unknown}; known: {ARMS}")
    if not 0 <= args.frozen_steps <= args.finetune_steps or args.finetune_steps < 2 or args.steps < 2:
        sys.exit(f"need --steps >= 2, --finetune_steps >= 2 and 0 <= --frozen_steps <= --finetune_steps, got "
                 f"{args.steps}, {args.finetune_steps}, {args.frozen_steps}")
    if args.smoke:
        args.sample_batch, args.eval_batch = min(args.sample_batch, 32), min(args.eval_batch, 16)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    done = {(r["arm"], r["seed"]) for r in results}

    data = ablation.load_bundle(args.bundle, args.scratch)
    if args.smoke:   # a CPU check of the whole path, numbers meaningless
        data = dataclasses.replace(data, test_tokens=data.test_tokens[:40], test_labels=data.test_labels[:40],
                                   test_images=data.test_images[:40])
    extractor = FeatureExtractor(data.inception, batch_size=10 if args.smoke else 500)
    reference = reference_from_features("fashion_mnist:test",
                                        extractor.features_of_array(data.test_images, progress=False).pool3)
    scorer = Scorer(data, extractor, reference, sample_batch=min(args.sample_batch, args.fid_samples))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
    trained = TrainedParams(args.scratch)
    log(f"bundle: {len(data.train_tokens)} train / {len(data.test_tokens)} test sequences; reference features done; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}; N={args.steps}, M={args.finetune_steps}, "
        f"K={args.frozen_steps}")

    seconds = {r["arm"]: r["arm_seconds"] for r in results}   # the deadline's estimates
    for seed in seeds:
        for arm in arms:
            if (arm, seed) in done:
                log(f"{arm} seed {seed}: in {args.results} already, skipped")
                continue
            elapsed = time.perf_counter() - started
            estimate = seconds.get(arm, FIRST_ESTIMATES[arm] * (0.05 if args.smoke else 1.0))
            if elapsed + 1.1 * estimate > args.deadline:
                log(f"stopping before {arm} seed {seed}: {elapsed:.0f}s spent, it takes ~{estimate:.0f}s, "
                    f"deadline {args.deadline:.0f}s")
                return
            log(f"{arm} seed {seed}")
            arm_started = time.perf_counter()
            if arm == "state_precision":
                record = run_state_precision(seed, args, data, mesh, scorer, trained, results, log)
            else:
                record = run_training_arm(arm, seed, args, data, mesh, scorer, trained, results, log)
            results.append(dict(arm=arm, seed=seed, **record, arm_seconds=round(time.perf_counter() - arm_started, 1),
                                fid_samples=args.fid_samples, device=jax.devices()[0].device_kind,
                                jax=jax.__version__, flax=flax.__version__, date=datetime.date.today().isoformat()))
            ablation.write_results(args.results, results)
            seconds[arm] = results[-1]["arm_seconds"]
            log(f"{arm} seed {seed} done in {results[-1]['arm_seconds']:.0f}s")


# ============================================================================= report


def render_tables(results: list) -> str:
    by_key = {(r["arm"], r["seed"]): r for r in results}
    lines = ["| arm | seed | steps (frozen) | test NLL (bits/token) | NLL before fine-tuning | FID, CFG 1 | "
             "FID, CFG 2 | training s (with compile) | arm s | accelerator s incl. its source |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in results if r["arm"] != "state_precision"),
                    key=lambda r: (ARMS.index(r["arm"]), r["seed"])):
        total = f"{r['arm_seconds']:.0f}"
        if r["arm"] == "linearized":
            source = by_key.get(("softmax", r["seed"]))
            total = f"{r['arm_seconds'] + source['arm_seconds']:.0f}" if source else "?"
        before = r.get("test_nll_before_finetuning")
        cfg2 = r.get("fid_cfg2")
        lines.append(f"| `{r['arm']}` | {r['seed']} | {r['steps']} ({r['frozen_steps']}) | "
                     f"{r['test_nll_bits_per_token']:.4f} | {'—' if before is None else f'{before:.4f}'} | "
                     f"{r['fid_cfg1']:.2f} | {'—' if cfg2 is None else f'{cfg2:.2f}'} | "
                     f"{r['train_seconds_with_compile']:.0f} | {r['arm_seconds']:.0f} | {total} |")
    precision = [r for r in results if r["arm"] == "state_precision"]
    if precision:
        lines += ["", "| seed | greedy: tokens agree | greedy: images agree | T=1, same keys: tokens agree | "
                  "T=1: images agree | FID CFG 1, float32 states | FID CFG 1, bfloat16 states |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(precision, key=lambda r: r["seed"]):
            g, s = r["greedy"], r["sampled_cfg1"]
            lines.append(f"| {r['seed']} | {g['token_agreement']:.4f} | {g['image_agreement']:.3f} ({g['images']}) | "
                         f"{s['token_agreement']:.4f} | {s['image_agreement']:.4f} ({s['images']}) | "
                         f"{r['fid_cfg1_float32']:.2f} | {r['fid_cfg1_bfloat16']:.2f} |")
    return "\n".join(lines)


def report(args) -> None:
    results = []
    for path in args.results:
        with open(path) as f:
            results.extend(json.load(f))
    print(render_tables(results))


# ============================================================================= command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    r = sub.add_parser("run", help="GPU: the arms per seed; appends to --results")
    r.add_argument("--bundle", required=True, help="benchmarks/ablation.py prepare's WORKDIR/bundle")
    r.add_argument("--results", required=True, help="JSON list; (arm, seed) pairs in it are skipped")
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--seeds", default="0,1")
    r.add_argument("--steps", type=int, default=600, help="N: softmax's steps (2d_scratch trains N + M)")
    r.add_argument("--finetune_steps", type=int, default=100, help="M: the linearized model's fine-tuning steps")
    r.add_argument("--frozen_steps", type=int, default=20, help="K: of those, attention-only updates")
    r.add_argument("--finetune_lr", type=float, default=None, help="default: configs/linearize.py:base=ablation's")
    r.add_argument("--fid_samples", type=int, default=10000)
    r.add_argument("--fid_cfg2", action="store_true", help="also FID at CFG 2 (a second compile and draw per arm)")
    r.add_argument("--sample_batch", type=int, default=1000)
    r.add_argument("--eval_batch", type=int, default=1000)
    r.add_argument("--smoke", action="store_true", help="the tiny model of ablation.py --smoke: a CPU check")
    r.add_argument("--deadline", type=float, default=570.0, help="seconds: no arm starts that would end after it")
    r.add_argument("--scratch", default="/tmp/linearize", help="unpacked Inception weights, trained parameters")
    o = sub.add_parser("report", help="markdown tables from results JSON files")
    o.add_argument("--results", nargs="+", required=True)
    args = parser.parse_args()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')} {platform.node()} python {sys.version.split()[0]}",
          flush=True)
    {"run": run, "report": report}[args.stage](args)


if __name__ == "__main__":
    main()
