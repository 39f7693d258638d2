"""README's Python blocks run as written (its shell commands run in .ci/run)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_python_blocks_run(capsys):
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "mIoU" in out
    assert namespace["grid"].best_params_["reduce__dim"] in (3, 6, 12)


# Documentation pages whose Python blocks run, each page in one namespace.
# tests/test_docs.py fails when a page with Python blocks is missing here.
DOC_PAGES = [
    "index.md",
    "getting-started.md",
    "guide/data.md",
    "guide/devices.md",
    "guide/evaluation.md",
    "guide/stego.md",
    "guide/study.md",
    "guide/sklearn.md",
    "guide/scaling.md",
]


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_python_blocks_run(page, capsys):
    blocks = _python_blocks(ROOT / "docs" / page)
    assert blocks, f"docs/{page} has no Python block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)


def test_readme_shell_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert commands, "README lists no commands"
    tested_elsewhere = {
        # run on a tiny folder by tests/test_examples.py
        "python examples/quickstart.py --images path/to/folder",
    }
    for block in commands:
        for line in block.strip().splitlines():
            if line in tested_elsewhere:
                continue
            assert line in ci, f"README command not run by .ci/run: {line}"
