#!/usr/bin/env python3
"""Train lasadgen_jax on a Cloud TPU VM slice (v4, v5e, v5p, v6e) through gcloud.

    tpu.py create --name=NAME --zone=ZONE --project=PROJECT --accelerator=v4 --size=32
    tpu.py setup  --name=NAME --zone=ZONE --project=PROJECT [--code=copy|git] [--tokens=gs://BUCKET/tokens/imagenet256]
    tpu.py train  --name=NAME --zone=ZONE --project=PROJECT --config=configs/imagenet256.py:size=L \\
                  --workdir=gs://BUCKET/runs/l-2d --tokens=gs://BUCKET/tokens/imagenet256 [--config.batch_size=512 ...]
    tpu.py logs   --name=NAME --zone=ZONE --project=PROJECT [--worker=0|all]
    tpu.py stop   --name=NAME --zone=ZONE --project=PROJECT    # SIGTERM: the run saves a checkpoint and exits
    tpu.py delete --name=NAME --zone=ZONE --project=PROJECT
    tpu.py up     (create + setup + train, the arguments of all three)
    tpu.py queued (up on a queued resource, spot by default, in a loop: a preempted slice is deleted and
                  asked for again, and training resumes from the last checkpoint in the gs:// workdir,
                  until the run has finished)

Every subcommand takes --dry-run: it prints the commands (gcloud, and git for --code=copy) and runs
nothing. The trainer runs on every worker with --config.distributed.initialize=yes; jax finds the
coordinator and the process ids from the TPU metadata. The workdir must be gs://: all workers write
their shards of each checkpoint there, and a re-created slice resumes from it. Tokens are copied
from gs:// to each worker's disk (the pipeline reads local files).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

# Sizes per generation: v4 and v5p count TensorCores (2 per chip, 4 chips per host), v5e and v6e chips.
ACCELERATORS = {
    "v4": {"prefix": "v4", "runtime": "tpu-ubuntu2204-base", "sizes": "a multiple of 8 (v4-8 = one host of 4 chips)"},
    "v5p": {"prefix": "v5p", "runtime": "v2-alpha-tpuv5", "sizes": "a multiple of 8 (v5p-8 = one host of 4 chips)"},
    "v5e": {"prefix": "v5litepod", "runtime": "v2-alpha-tpuv5-lite", "sizes": "one of 1, 4, 8, 16, 32, 64, 128, 256"},
    "v6e": {"prefix": "v6e", "runtime": "v2-alpha-tpuv6e", "sizes": "one of 1, 4, 8, 16, 32, 64, 128, 256"},
}
ACCELERATORS["v5litepod"] = ACCELERATORS["v5e"]
POD_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
CODE_DIR = "$HOME/lasadgen_jax"         # on every worker
TOKENS_DIR = "$HOME/tokens"
LOG, EXIT_FILE, PID_FILE = "$HOME/train.log", "$HOME/train.exit", "$HOME/train.pid"
LOST_STATES = ("FAILED", "SUSPENDING", "SUSPENDED")    # a queued resource that will not come back


def accelerator_type(accelerator: str, size: int) -> str:
    spec = ACCELERATORS[accelerator]
    valid = size >= 8 and size % 8 == 0 if spec["prefix"] in ("v4", "v5p") else size in POD_SIZES
    if not valid:
        raise ValueError(f"--size {size} for --accelerator={accelerator}: must be {spec['sizes']}")
    return f"{spec['prefix']}-{size}"


# ----------------------------------------------------------------------------- the commands


def gcloud() -> list[str]:
    return [os.environ.get("GCLOUD", "gcloud")]


def location(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return gcloud() + ["compute", "tpus", "tpu-vm", "ssh", args.name, *location(args), f"--worker={worker}",
                       "--command", command]


def create_command(args) -> list[str]:
    capacity = {"on-demand": [], "spot": ["--spot"], "preemptible": ["--preemptible"]}[args.capacity]
    return gcloud() + ["compute", "tpus", "tpu-vm", "create", args.name, *location(args),
                       f"--accelerator-type={accelerator_type(args.accelerator, args.size)}",
                       f"--version={args.runtime_version or ACCELERATORS[args.accelerator]['runtime']}", *capacity]


def queued_name(args) -> str:
    return f"{args.name}-qr"


def queued_create_command(args) -> list[str]:
    capacity = {"spot": ["--spot"], "on-demand": [], "reserved": ["--reserved"]}[args.capacity]
    return gcloud() + ["compute", "tpus", "queued-resources", "create", queued_name(args), f"--node-id={args.name}",
                       *location(args), f"--accelerator-type={accelerator_type(args.accelerator, args.size)}",
                       f"--runtime-version={args.runtime_version or ACCELERATORS[args.accelerator]['runtime']}",
                       *capacity]


def queued_describe_command(args) -> list[str]:
    return gcloud() + ["compute", "tpus", "queued-resources", "describe", queued_name(args), *location(args),
                       "--format=value(state.state)"]


def queued_delete_command(args) -> list[str]:
    # --force: the TPU VM goes with its request.
    return gcloud() + ["compute", "tpus", "queued-resources", "delete", queued_name(args), *location(args),
                       "--force", "--quiet"]


def archive_path(args) -> str:
    return os.path.join(tempfile.gettempdir(), f"lasadgen_jax-{args.name}.tar.gz")


def setup_commands(args) -> list[list[str]]:
    """Code (a copy of this checkout's HEAD, or a git clone), lasadgen_jax + jax[tpu] + gcsfs, tokens."""
    jax = f"jax[tpu]=={args.jax_version}" if args.jax_version else "jax[tpu]"
    install = f'python3 -m pip install -q -e "{CODE_DIR}" "{jax}" gcsfs'
    commands = []
    if args.code == "copy":
        archive = archive_path(args)
        commands.append(["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"])
        commands.append(gcloud() + ["compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:lasadgen_jax.tar.gz",
                                    *location(args), "--worker=all"])
        fetch = (f'rm -rf "{CODE_DIR}" && mkdir -p "{CODE_DIR}" && '
                 f'tar -xzf "$HOME/lasadgen_jax.tar.gz" -C "{CODE_DIR}"')
    else:
        fetch = (f'(test -d "{CODE_DIR}/.git" || git clone -q {shlex.quote(args.repo)} "{CODE_DIR}") && '
                 f'git -C "{CODE_DIR}" fetch -q origin && git -C "{CODE_DIR}" checkout -q {shlex.quote(args.ref)}')
    commands.append(ssh(args, f"set -e; {fetch} && {install}"))
    if args.tokens:
        commands.append(ssh(args, f'mkdir -p "{TOKENS_DIR}" && gcloud storage rsync --recursive '
                                  f'{shlex.quote(args.tokens.rstrip("/"))} "{local_tokens(args)}"'))
    return commands


def local_tokens(args) -> str:
    return f"{TOKENS_DIR}/{os.path.basename(args.tokens.rstrip('/'))}"


def train_command(args) -> list[str]:
    """Start the trainer on every worker, detached, in its own process group (for `stop`); its exit
    status goes to ~/train.exit, its output to ~/train.log."""
    trainer = ["python3", "-m", "lasadgen_jax.train", f"--config={args.config}", f"--workdir={args.workdir}",
               "--config.distributed.initialize=yes", *args.overrides]
    inner = f'cd "{CODE_DIR}" && ' + " ".join(shlex.quote(part) for part in trainer)
    if args.tokens:
        inner += f' "--config.data.tokens_dir={local_tokens(args)}"'
    inner += f'; echo $? > "{EXIT_FILE}"'
    return ssh(args, f'rm -f "{EXIT_FILE}"; setsid nohup bash -c {shlex.quote(inner)} > "{LOG}" 2>&1 < /dev/null & '
                     f'echo $! > "{PID_FILE}"')


def status_command(args) -> list[str]:
    """On worker 0 (process 0 prints 'done: ...' when the run is complete): running | exit=N done=0|1."""
    return ssh(args, f'if [ -f "{EXIT_FILE}" ]; then echo "exit=$(cat "{EXIT_FILE}") '
                     f'done=$(grep -c "^done: " "{LOG}")"; else echo running; fi', worker="0")


def logs_command(args) -> list[str]:
    return ssh(args, f'tail -n {args.lines} -F "{LOG}"', worker=args.worker)


def stop_command(args) -> list[str]:
    return ssh(args, f'kill -TERM -- -$(cat "{PID_FILE}")')


def delete_command(args) -> list[str]:
    return gcloud() + ["compute", "tpus", "tpu-vm", "delete", args.name, *location(args), "--quiet"]


# ----------------------------------------------------------------------------- running them


def show(command: list[str]) -> None:
    print(shlex.join(command), flush=True)


def run(command: list[str], args, *, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess | None:
    """Print the command; unless --dry-run, run it (from the repository root, for git archive)."""
    show(command)
    if args.dry_run:
        return None
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(command, cwd=repository, text=True, capture_output=capture)
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise SystemExit(f"command failed ({result.returncode}): {shlex.join(command)}\n{detail}")
    return result


def queued_state(args) -> str | None:
    result = run(queued_describe_command(args), args, capture=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def training_status(args) -> str:
    result = run(status_command(args), args, capture=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "unreachable"


def run_queued(args) -> int:
    """Ask for the slice, set it up, train; when the slice is lost (preempted), delete the request and
    ask again; the trainer resumes from the workdir's latest checkpoint. Ends when process 0 has
    printed 'done:' and exited 0, or after --max-restarts."""
    if args.dry_run:
        run(queued_create_command(args), args)
        print(f"# until ACTIVE, every {args.poll_seconds:g} s:", flush=True)
        run(queued_describe_command(args), args)
        for command in setup_commands(args) + [train_command(args)]:
            run(command, args)
        print(f"# while ACTIVE, every {args.poll_seconds:g} s: the state (as above) and, on worker 0,", flush=True)
        run(status_command(args), args)
        print(f"# state {'/'.join(LOST_STATES)}: delete, then again from create (at most {args.max_restarts} "
              f"restarts); exit=0 done=0 (SIGTERM on a live slice) or exit!=0: train again; done: delete", flush=True)
        run(queued_delete_command(args), args)
        return 0
    restarts, need_setup = 0, True
    if queued_state(args) is None:
        run(queued_create_command(args), args)
    while True:
        state = queued_state(args)
        if state in LOST_STATES or state is None:
            if restarts >= args.max_restarts:
                print(f"slice lost ({state}) after {restarts} restarts: giving up", file=sys.stderr)
                return 1
            restarts += 1
            print(f"slice lost ({state}): asking again (restart {restarts} of at most {args.max_restarts})", flush=True)
            if state is not None:
                run(queued_delete_command(args), args, check=False)
            run(queued_create_command(args), args)
            need_setup = True
            continue
        if state != "ACTIVE":
            time.sleep(args.poll_seconds)
            continue
        if need_setup:
            for command in setup_commands(args):
                run(command, args)
            run(train_command(args), args)
            need_setup = False
        time.sleep(args.poll_seconds)
        status = training_status(args)
        if status.startswith("exit="):
            fields = dict(part.split("=", 1) for part in status.split())
            if fields.get("exit") == "0" and fields.get("done", "0") != "0":
                print("training done", flush=True)
                if not args.keep:
                    run(queued_delete_command(args), args)
                return 0
            if restarts >= args.max_restarts:
                print(f"training stopped ({status}) after {restarts} restarts: giving up; see `tpu.py logs`",
                      file=sys.stderr)
                return 1
            restarts += 1
            print(f"training stopped ({status}) on a live slice: starting it again (restart {restarts})", flush=True)
            run(train_command(args), args)


# ----------------------------------------------------------------------------- arguments


def gs_uri(value: str) -> str:
    if not value.startswith("gs://") or len(value.rstrip("/")) <= len("gs://"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a gs:// location (every worker must reach it)")
    return value


def version(value: str) -> str:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a version such as 0.10.2")
    return value


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def add_common(parser):
    parser.add_argument("--name", required=True, help="TPU VM name (the queued resource is NAME-qr)")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def add_create(parser, capacities, default):
    parser.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS), help="TPU generation")
    parser.add_argument("--size", required=True, type=positive,
                        help="v4/v5p: TensorCores (multiple of 8); v5e/v6e: chips (1, 4, 8, ..., 256)")
    parser.add_argument("--runtime-version", default=None,
                        help="default: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e), "
                             "v2-alpha-tpuv6e (v6e)")
    parser.add_argument("--capacity", choices=capacities, default=default, help=f"default {default}")


def add_tokens(parser):
    parser.add_argument("--tokens", type=gs_uri, default=None,
                        help="gs:// token directory (lasadgen_jax.data.extract), copied to ~/tokens/ on every worker")


def add_setup(parser):
    add_tokens(parser)
    parser.add_argument("--code", choices=("copy", "git"), default="copy",
                        help="copy: this checkout's HEAD (git archive, scp); git: clone --repo at --ref")
    parser.add_argument("--repo", default=None, help="git URL for --code=git")
    parser.add_argument("--ref", default="main", help="branch, tag or commit for --code=git")
    parser.add_argument("--jax-version", type=version, default=None, help="pin jax[tpu]==VERSION (default: the newest)")


def add_train(parser):
    parser.add_argument("--config", required=True, help="e.g. configs/imagenet256.py:size=L,attention=2d")
    parser.add_argument("--workdir", required=True, type=gs_uri, help="gs://BUCKET/runs/NAME")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n\n")[0],
                                     epilog="Trainer overrides (--config.x=y) follow the train/up/queued arguments.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    help_of = {"create": "create the TPU VM slice", "setup": "code, packages and tokens on every worker",
               "train": "start the trainer on every worker (detached)", "logs": "follow a worker's train.log",
               "stop": "SIGTERM the trainer (it saves a checkpoint)", "delete": "delete the slice",
               "up": "create + setup + train", "queued": "queued resource (spot) with restart until done"}
    sub = {name: commands.add_parser(name, help=text, description=text) for name, text in help_of.items()}
    for parser_ in sub.values():
        add_common(parser_)
    add_create(sub["create"], ("on-demand", "spot", "preemptible"), "on-demand")
    add_create(sub["up"], ("on-demand", "spot", "preemptible"), "on-demand")
    add_create(sub["queued"], ("spot", "on-demand", "reserved"), "spot")
    for name in ("setup", "up", "queued"):
        add_setup(sub[name])
    add_tokens(sub["train"])
    for name in ("train", "up", "queued"):
        add_train(sub[name])
    sub["logs"].add_argument("--worker", default="0", help="a worker number, or all")
    sub["logs"].add_argument("--lines", type=positive, default=100)
    sub["queued"].add_argument("--max-restarts", type=int, default=20)
    sub["queued"].add_argument("--poll-seconds", type=float, default=60.0)
    sub["queued"].add_argument("--keep", action="store_true", help="keep the slice when training is done")
    return parser, sub


def parse(argv: list[str] | None):
    parser, sub = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra
    subparser = sub[args.command]
    takes_overrides = args.command in ("train", "up", "queued")
    bad = [item for item in extra if not (takes_overrides and item.startswith("--config.") and "=" in item)]
    if bad:
        subparser.error(f"unrecognized arguments: {' '.join(bad)}"
                        + (" (trainer overrides are --config.KEY=VALUE)" if takes_overrides else ""))
    if getattr(args, "code", None) == "git" and not args.repo:
        subparser.error("--code=git needs --repo")
    if takes_overrides and not args.tokens and not any(o.startswith("--config.data.tokens_dir=") for o in extra):
        subparser.error("give --tokens=gs://... (copied to every worker by setup) or --config.data.tokens_dir=PATH "
                        "(a directory that exists on every worker)")
    if hasattr(args, "accelerator"):
        try:
            accelerator_type(args.accelerator, args.size)
        except ValueError as error:
            subparser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command == "queued":
        return run_queued(args)
    steps = {"create": lambda: [create_command(args)], "setup": lambda: setup_commands(args),
             "train": lambda: [train_command(args)], "logs": lambda: [logs_command(args)],
             "stop": lambda: [stop_command(args)], "delete": lambda: [delete_command(args)],
             "up": lambda: [create_command(args)] + setup_commands(args) + [train_command(args)]}
    for command in steps[args.command]():
        run(command, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
