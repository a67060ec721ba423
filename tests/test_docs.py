"""The documentation site: it builds with every link and anchor resolved, and every key of conf/ is explained."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "config_reference.py"


def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_key_of_conf_has_a_comment():
    missing = config_reference().undocumented()
    assert not missing, "keys without a comment (add `# what it does` on the key's line):\n" + "\n".join(missing)


def test_a_key_without_a_comment_is_found_and_comments_are_read_back(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "_base.yaml").write_text(
        "# Shared model keys.\n"
        "backbone: resnet18          # any timm model name\n"
        "head:\n"
        "  dropout: 0.0              # dropout before the output layer;\n"
        "                            # 0: none\n"
        "  hidden: null\n"
        "# the learning rate of the head,\n"
        "# relative to the backbone's\n"
        "head_lr: 10\n"
    )
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - model: _base\n  - _self_\n"
        "seed: 1                     # seeds everything\n"
        "model:\n  backbone: densenet121\n"
        "tag: '#1'\n"
    )
    reference = config_reference()
    assert reference.undocumented(tmp_path) == ["model/_base.yaml:6 head.hidden", "train.yaml:7 tag"]
    keys = {f"{config.name}:{key.name}": key for config in reference.config_files(tmp_path) for key in config.keys}
    assert keys["model/_base:head.dropout"].comment == "dropout before the output layer; 0: none"
    assert keys["model/_base:head_lr"].comment == "the learning rate of the head, relative to the backbone's"
    assert keys["train:model.backbone"].comment == "any timm model name"  # a set key explained where it is defined
    assert keys["train:tag"].value == "'#1'"


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed in this environment: pip install -e '.[test]' installs it.")
    site = tmp_path / "site"
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (site / "reference" / "configuration" / "index.html").read_text()
    assert "min_brain_fraction" in page and "drop slices with less brain-density tissue" in page
