"""What every command-line entry point shares: absl flags, quiet library logs, user errors as one line.

    if __name__ == "__main__":
        define_flags()
        cli.run(main)

`run` adds `--debug` and `--compilation_cache_dir`: compiled programs are kept on disk (jax's
persistent compilation cache, by default in ~/.cache/lasadgen_jax/compilation_cache, at most 8 GiB,
least recently used first out), so a rerun, or a training run resumed after preemption, loads what it
compiled before instead of compiling it again. Library INFO logs (Orbax, absl) are silenced unless
`--verbosity` is given;
a ValueError or FileNotFoundError (bad flags, config or input) prints `error: ...` on stderr and
exits with status 2, a FloatingPointError (a diverged run: too many non-finite steps, or a
non-finite state refused at a save) exits with status 3; the full traceback only under `--debug`
or `--verbosity>=1`.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "lasadgen_jax", "compilation_cache")
COMPILATION_CACHE_MAX_BYTES = 8 * 2**30


def use_compilation_cache(directory: str) -> str | None:
    """Keeps compiled programs in `directory` (jax's persistent compilation cache; only programs that took
    jax_persistent_cache_min_compile_time_secs, 1 s by default, to compile). '' turns it off; a
    JAX_COMPILATION_CACHE_DIR in the environment wins over `directory`. A directory that cannot be written is
    reported on stderr and the cache left off. Returns the directory in use, or None."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not directory:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = os.path.expanduser(directory)
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:   # a cache is an optimisation: the command runs, compiling as it would without one
        print(f"warning: compilation cache off: {path} cannot be written (--compilation_cache_dir)", file=sys.stderr)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return path


def _wants_traceback() -> bool:
    FLAGS = flags.FLAGS
    if FLAGS.is_parsed():
        return bool(FLAGS.debug) or FLAGS.verbosity >= 1
    return any(arg in ("--debug", "-debug") or arg.startswith(("--verbosity=1", "--verbosity=2", "-v=1"))
               for arg in sys.argv[1:])


def config_load_error(error: BaseException) -> str | None:
    """ml_collections' report of a config file that cannot be loaded, as one line (None: not that)."""
    text = str(error)
    if "Failed loading config file" not in text and "earlier failure to load" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    path = next((line for line in lines[1:] if not line.startswith(("Attempted", "["))), "?")
    reason = lines[-1] if len(lines) > 1 else text
    return f"--config {path}: {reason}"


def unknown_config_key_error(error: BaseException) -> str | None:
    """ml_collections' KeyError/AttributeError for a --config.a.b=... override of a key the config lacks,
    as one line naming the override (None: not that)."""
    text = str(error)
    keys = re.findall(r"'([A-Za-z_][A-Za-z0-9_]*)'", text.replace("\\'", "'"))
    overrides = [arg.split("=", 1)[0] for arg in sys.argv[1:] if arg.startswith("--config.")]
    culprit = next((arg for arg in overrides for key in keys if arg.split(".")[-1] == key), None)
    if culprit is None:
        return None
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    return f"{culprit}: config has no such key" + (f" (did you mean {suggestion.group(1)}?)" if suggestion else "")


def _quiet_main(main):
    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
        use_compilation_cache(flags.FLAGS.compilation_cache_dir)
        main(argv)  # a returned value would become the exit status under app.run
    return wrapped


def run(main) -> None:
    """absl's app.run(main) with --debug, --compilation_cache_dir, quiet logs and one-line user errors (exit
    status 2)."""
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, "Show the full traceback of an error (as does --verbosity=1).")
    if "compilation_cache_dir" not in flags.FLAGS:
        flags.DEFINE_string("compilation_cache_dir", DEFAULT_COMPILATION_CACHE, "Keep compiled programs here, so "
                            "that a rerun or a resumed run does not compile them again ('' = off; "
                            "JAX_COMPILATION_CACHE_DIR, if set, wins).")
    try:
        app.run(_quiet_main(main))
    except USER_ERRORS as error:
        if _wants_traceback():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:  # diverged (train_state.TrainingDiverged), or a non-finite state to save
        if _wants_traceback():
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    except (AttributeError, KeyError) as error:  # ml_collections, for an override of an unknown config key
        message = None if flags.FLAGS.is_parsed() else unknown_config_key_error(error)
        if message is None or _wants_traceback():
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # ml_collections raises OSError for a config file it cannot load
        message = config_load_error(error)
        if message is None or _wants_traceback():
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
