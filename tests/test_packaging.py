"""The project as users get it: declared dependencies, the licence, no private internals, the
README's order, the Quickstart in a fresh venv (slow)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from convnext_cifar import __version__

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the packaging checks read pyproject)


ROOT = ROOT


STDLIB = set(sys.stdlib_module_names)


DISTRIBUTIONS = {"PIL": "pillow", "huggingface_hub": "huggingface-hub",
                 "mlflow": "mlflow-skinny"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_the_code_imports_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-")
                for d in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {re.split(r"[<>=\[ ]", d)[0].lower().replace("_", "-") for d in extra}
    imported = set().union(*(_imports(p) for p in (ROOT / "convnext_cifar").rglob("*.py")))
    third_party = {m for m in imported - STDLIB if m not in ("convnext_cifar", "__future__")}
    missing = {m for m in third_party
               if DISTRIBUTIONS.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing
    assert {"numpy", "pillow", "huggingface-hub"} <= declared
    assert "version" in project["dynamic"] and "version" not in project
    assert {"wandb", "mlflow-skinny", "optuna", "matplotlib"} <= declared  # the folders' imports


def test_the_all_extra_holds_every_feature_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (everything,) = extras["all"]
    named = set(re.search(r"\[(.*)\]", everything)[1].split(","))
    assert named == set(extras) - {"all", "test", "docs"}  # docs: the site, not a feature


def test_a_licence_file_matches_the_declared_licence():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    readme = (ROOT / "README.md").read_text()
    assert "CC-BY-NC 4.0" in readme


def test_no_private_internals_without_a_fallback(monkeypatch):
    from huggingface_hub import constants

    from convnext_cifar.model.build import hub_offline_unless_reachable
    from convnext_cifar.model.optim import fused_supported

    assert fused_supported("cpu") and not fused_supported("meta")
    source = "\n".join(p.read_text() for p in (ROOT / "convnext_cifar").glob("*.py"))
    assert "torch.utils._" not in source and "_get_fused" not in source
    monkeypatch.delattr(constants, "HF_HUB_OFFLINE")  # a hub client without the switch
    with hub_offline_unless_reachable({"hf_hub_id": "timm/x"}) as unreachable:
        assert unreachable == ""


def test_the_readme_reads_in_a_newcomers_order():
    text = (ROOT / "README.md").read_text()
    headings = [h for h in re.findall(r"^## (.+)$", text, re.M)]
    order = ["Quickstart", "Install", "Results", "Your own images", "Common tasks",
             "Documentation", "License"]
    found = [next(i for i, h in enumerate(headings) if h.startswith(o)) for o in order]
    assert found == sorted(found), headings
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "python3 -m venv" in quickstart and ". .venv/bin/activate" in quickstart
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.findall(r"```bash\n(.+?)\n```", quickstart, re.S)[1].strip()
    assert test_command in ci


def test_the_readme_stays_a_short_entry_point():
    """At most ~300 lines: what it is, the Quickstart, install, results, the common tasks;
    the rest lives in the docs site, linked from it."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / page).exists(), page


@pytest.mark.slow
def test_the_quickstart_installs_in_a_fresh_venv(tmp_path):
    """A fresh venv (no system packages): `pip install .` and the console script works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(ROOT)], check=True, timeout=1800)
    out = subprocess.run([str(venv / "bin" / "convnext-cifar"), "--version"], check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == f"convnext-cifar {__version__}"
    out = subprocess.run([str(venv / "bin" / "convnext-cifar"), "train", "--preset", "smoke",
                          "--print-config"], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert json.loads(out.stdout)["model"]["name"] == "convnextv2_atto"
