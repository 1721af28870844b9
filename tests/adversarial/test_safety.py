"""Safety rules, checked on the source and on behaviour: no pickle from model folders, no remote code, a
demo that listens on 127.0.0.1 unless told otherwise. (Upload paths that leave Gradio's folder are corpus
cases: see `cases.py`, run by `test_demo.py`.)"""

from __future__ import annotations

import ast
import inspect
import pickle
import re
import shutil

import pytest
import torch

from mmgen.app import launch, serve
from mmgen.app.loadtest import HOST
from mmgen.cli import build_parser
from mmgen.loading import load_backbone
from mmgen.pipelines import MMGenPipeline

from ..conftest import ROOT
from .cases import MODELS

PACKAGE_DIRS = ("mmgen", "pipelines", "evals", "app")


def package_sources():
    for folder in PACKAGE_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def calls(tree: ast.AST, module: str, name: str):
    """Calls spelled `module.name(...)`."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_every_torch_load_in_the_package_is_weights_only_and_nothing_unpickles():
    offenders = []
    for path in package_sources():
        tree = ast.parse(path.read_text(), str(path))
        for call in calls(tree, "torch", "load"):
            flags = {k.arg: k.value for k in call.keywords}
            if not (isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.load without weights_only=True")
        for name in ("load", "loads", "Unpickler"):
            offenders += [f"{path.relative_to(ROOT)}:{c.lineno} pickle.{name}" for c in calls(tree, "pickle", name)]
    assert not offenders, offenders


def test_no_remote_code_is_trusted_anywhere_in_the_repository():
    pattern = re.compile(r"trust_remote_code\s*[=:]\s*(True|true|1)")
    # The project's own files only: a virtual environment inside the checkout (as CI makes) is not ours.
    ignored = {".git", ".venv", "venv", "build", ".pytest_cache", ".ruff_cache", ".hypothesis"}
    hits = [f"{path.relative_to(ROOT)}" for path in ROOT.rglob("*")
            if path.suffix in (".py", ".yaml", ".yml", ".json", ".md", ".toml")
            and not ignored.intersection(path.relative_to(ROOT).parts)
            and path.is_file() and pattern.search(path.read_text(errors="replace"))]
    assert not hits, hits


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_a_folder_with_only_pickled_weights_is_refused_without_opening_them(model_dir, tmp_path, no_unpickling):
    folder = MODELS["pickle_backbone"](model_dir, tmp_path / "model")
    with pytest.raises(ValueError, match="pickle-format weights .* mmgen loads safetensors only"):
        MMGenPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="pickle-format weights"):
        load_backbone(folder / "backbone")


def test_a_pickle_beside_the_safetensors_is_never_read(model_dir, tmp_path, no_unpickling):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "backbone" / "pytorch_model.bin").write_bytes(b"\x80\x04 a trap that must stay closed")
    pipe = MMGenPipeline.from_pretrained(folder)
    assert pipe.backbone.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer)


def test_the_demo_and_its_load_test_listen_on_127_0_0_1_by_default():
    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(launch).parameters["share"].default is False
    assert build_parser().parse_args(["demo"]).host == "127.0.0.1"
    assert HOST == "127.0.0.1"
