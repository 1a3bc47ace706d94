"""Every ```python block of README.md and docs/*.md runs as written (on the small shapes the docs use).

A file's blocks run in order in one namespace (a later block may use an earlier one's names), in a
fresh working directory; a file whose examples read files on disk gets them made first (SETUP).
"""

from __future__ import annotations

import glob
import os
import re

import pytest
from helpers import write_synthetic_token_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)

# What a document's examples expect to find in the working directory.
SETUP = {
    "docs/data.md": lambda: write_synthetic_token_dir("tokens/fashion_mnist", grid=(8, 8), codebook_size=1024,
                                                      num_classes=10, num_records=128, shard_size=64),
}


def python_blocks(document: str) -> list[str]:
    with open(os.path.join(REPO, document)) as f:
        return PYTHON_BLOCK.findall(f.read())


def test_the_documents_have_examples():
    assert len(python_blocks("README.md")) >= 2
    assert sum(len(python_blocks(d)) for d in DOCUMENTS) >= 4


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if python_blocks(d)])
def test_python_examples_run(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if document in SETUP:
        SETUP[document]()
    namespace = {"__name__": "__doc_example__"}
    for number, block in enumerate(python_blocks(document), 1):
        try:
            exec(compile(block, f"{document} python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{document}, python block {number} fails: {error!r}\n{block}") from error
