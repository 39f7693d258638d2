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
    "guide/reproducing.md",
    "guide/study.md",
    "guide/sklearn.md",
    "guide/from-sklearn.md",
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
        # run below, on a tiny folder with a locally saved ViT-S/8
        SEGMENT_COMMAND,
        # run below, with a checkpoint in the reference's format
        *CHECKPOINT_COMMANDS,
    }
    for block in commands:
        for line in block.strip().splitlines():
            if line in tested_elsewhere:
                continue
            assert line in ci, f"README command not run by .ci/run: {line}"


SEGMENT_COMMAND = (
    "skstego segment path/to/folder --out segmented --k 27 "
    "--weights dino_vits8.safetensors"
)


def test_readme_segment_command_runs_offline(tmp_path, monkeypatch):
    import shlex

    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from skstego.cli import main
    from skstego.datasets import make_scenes

    readme = (ROOT / "README.md").read_text()
    assert SEGMENT_COMMAND in readme
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "path" / "to" / "folder"
    folder.mkdir(parents=True)
    images, _ = make_scenes(2, size=(40, 48), random_state=0)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i}.png")
    # a randomly initialised ViT-S/8 saved where the command expects DINO
    vit = timm.create_model("vit_small_patch8_224", pretrained=False)
    save_file(vit.state_dict(), str(tmp_path / "dino_vits8.safetensors"))
    argv = shlex.split(SEGMENT_COMMAND)
    assert argv[0] == "skstego"
    assert main([*argv[1:], "--device", "cpu", "--quiet"]) == 0
    for i in range(2):
        label = np.asarray(
            Image.open(tmp_path / "segmented" / "folder" / f"img{i}_label.png")
        )
        assert label.shape == (40, 48)
        assert (tmp_path / "segmented" / "folder" / f"img{i}_overlay.png").exists()
    assert (tmp_path / "segmented" / "summary.csv").exists()


CHECKPOINT_COMMANDS = (
    "skstego segment path/to/folder --out segmented --checkpoint "
    "cocostuff27_vit_base_5.ckpt",
    "skstego evaluate --protocol stego --checkpoint cocostuff27_vit_base_5.ckpt "
    "--dataset cocostuff27 --root data/cocostuff",
)


def test_readme_checkpoint_commands_run(tmp_path, monkeypatch, capsys):
    """README's checkpoint commands, as written, on a synthetic checkpoint in the
    reference's format (tests/test_stego_checkpoint.py builds it) and a
    COCO-Stuff tree; evaluate runs the full protocol at 320 px."""
    import shlex

    import numpy as np
    from PIL import Image
    from test_stego_checkpoint import _coco_tree, _make_checkpoint

    from skstego.cli import main
    from skstego.datasets import make_scenes

    readme = (ROOT / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    path, _, _ = _make_checkpoint(tmp_path, n_classes=27, extra=0)
    path.rename(tmp_path / "cocostuff27_vit_base_5.ckpt")
    folder = tmp_path / "path" / "to" / "folder"
    folder.mkdir(parents=True)
    images, _ = make_scenes(1, size=(40, 48), random_state=0)
    Image.fromarray(images[0]).save(folder / "img0.png")
    _coco_tree(tmp_path / "data" / "cocostuff", n_images=3)
    for command in CHECKPOINT_COMMANDS:
        assert command in readme
        argv = shlex.split(command)
        assert argv[0] == "skstego"
        assert main([*argv[1:], "--device", "cpu", "--quiet"]) == 0
    label = np.asarray(Image.open(tmp_path / "segmented" / "folder" / "img0_label.png"))
    assert label.shape == (40, 48) and label.max() < 27
    out = capsys.readouterr().out
    assert "images: 2" in out  # the _7 list: two of the three images
    assert "STEGO published" in out
