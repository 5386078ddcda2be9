"""The package's seams: one home per concern, checked on the source and in fresh processes."""

import ast
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from convnext_cifar import config
from convnext_cifar.datasets import DATASETS

PACKAGE = Path(config.__file__).parent
ROOT = PACKAGE.parent


def _sources():
    return sorted(PACKAGE.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_no_function_is_longer_than_55_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 55:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_using_a_model_never_imports_the_trainer():
    loaded = _modules_loaded_by("import convnext_cifar.predict, convnext_cifar.export, "
                                "convnext_cifar.evaluate, benchmarks.decode")
    assert "convnext_cifar.evaluate" in loaded and "convnext_cifar.engine" not in loaded


def test_the_command_line_modules_do_not_import_torch():
    loaded = _modules_loaded_by("import convnext_cifar.cli, convnext_cifar.presets")
    assert "convnext_cifar.datasets" in loaded and "torch" not in loaded


def test_only_datasets_py_knows_the_dataset_names():
    names = set(DATASETS)
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "datasets.py":  # the registry itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                if any(isinstance(p, ast.Constant) and p.value in names for p in parts) or any(
                        isinstance(p, ast.Attribute) and p.attr == "dataset" for p in parts):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []
    # --data.dataset takes exactly the registry's names
    hints = typing.get_type_hints(config.DataConfig)
    assert typing.get_args(hints["dataset"]) == tuple(DATASETS)


def test_a_new_dataset_kind_is_one_class_and_one_registry_entry(tmp_path):
    """A kind registered before the command line is imported trains, evaluates and names its
    runs with nothing else changed."""
    script = textwrap.dedent(f"""
        import torch
        from convnext_cifar import datasets
        from convnext_cifar.datasets import Dataset, DatasetKind, Split, identity_of

        class Noise(DatasetKind):
            title = "noise"
            def run_label(self, cfg): return "noise"
            def stored_size(self, cfg): return 32
            def standard_normalisation(self): return (127.5,) * 3, (64.0,) * 3
            def prepare(self, cfg): pass
            def load(self, cfg, train, host_share):
                g = torch.Generator().manual_seed(0)
                def split(n):
                    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                               generator=g), torch.arange(n) % 3)
                return Dataset(split(12), ["a", "b", "c"], (127.5,) * 3, (64.0,) * 3,
                               identity_of(["a", "b", "c"], ["noise"], ["noise"]),
                               train=split(24) if train else None)

        datasets.DATASETS["noise"] = Noise()
        from convnext_cifar import cli
        work = {str(tmp_path / "run")!r}
        assert cli.main(["train", "--preset", "smoke", "--data.dataset", "noise",
                         "--sched.epochs", "1", "--sched.warmup-epochs", "0",
                         "--data.batch-size", "8", "--work-dir", work, "--device", "cpu",
                         "--compile", "off"]) == 0
        assert cli.main(["eval", work + "/best.safetensors", "--json"]) == 0
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["num_images"] == 12 and len(result["confusion"]) == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["name"] == (
        "convnextv2-atto_noise-smoke")


@pytest.mark.parametrize("module", ["config", "presets"])
def test_presets_state_only_what_they_change(module):
    """Field docstrings live once, in config.py; presets.py repeats none of them."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    repeated = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body[1:] if ast.get_docstring(cls) else cls.body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(
                    b.value, ast.Constant) and isinstance(b.value.value, str):
                repeated.append(f"{cls.name}.{a.target.id}")
    if module == "presets":
        assert repeated == []
    else:
        assert "DataConfig.dataset" in repeated  # config.py does document its fields
