"""The documentation: the generated CLI reference lists every option of every command, every
command the README and the guides show parses, every option they name exists, and the site
builds with `mkdocs build --strict`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from convnext_cifar import cli
from convnext_cifar.cli_errors import parse
from convnext_cifar.config import TuneConfig, options, to_dict
from convnext_cifar.errors import UserError
from tests.support import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _reference_module():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _reference_module()


def _sections(markdown: str) -> dict[str, str]:
    """The reference's text per command (from its `## `name`` heading to the next)."""
    parts = re.split(r"^## `([a-z-]+)`$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _help_options(command: str) -> set[str]:
    """Every --option `convnext-cifar COMMAND --help` prints: what a user can type."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert cli.main([command, "--help"]) == 0
    return set(re.findall(r"(?<![\w-])--[a-z][\w.-]*[a-z]", out.getvalue())) - {"--help"}


def test_the_reference_lists_every_option_of_every_command():
    sections = _sections(reference.reference_markdown())
    assert list(sections) == list(cli.commands(cli.PRESETS[cli.DEFAULT_PRESET]()))
    for command, text in sections.items():
        listed = set(re.findall(r"--[a-z][\w.-]*[a-z]", text))
        assert _help_options(command) - listed == set(), command
    # and, from the dataclasses themselves: every config field under its dotted name
    dotted = {"--" + name.replace("_", "-") for name in options()}
    for command in ("train", "tune"):
        assert dotted - set(re.findall(r"--[a-z][\w.-]*[a-z]", sections[command])) == set()
    tune_fields = {"--tune." + name.replace("_", "-") for name in options(TuneConfig)}
    assert tune_fields - set(re.findall(r"--tune\.[\w-]*[a-z]", sections["tune"])) == set()


def test_each_option_shows_its_type_default_and_docstring():
    rows = {names: rest for names, *rest in
            reference.option_rows(reference.parsers()["train"])}
    kind, default, text = rows["--optim.lr"]
    assert (kind, default) == ("FLOAT|{auto}", "0.004")
    assert text == ("Peak learning rate (reached at the end of warmup); auto: found first by "
                    "lr-find's test.")  # OptimConfig's docstring
    assert rows["--data.download / --data.no-download"][:2] == ["flag", "True"]
    assert rows["--precision"][0] == "{auto,fp32,bf16,fp16}"
    eval_rows = {names: rest for names, *rest in
                 reference.option_rows(reference.parsers()["eval"])}
    assert eval_rows["CKPT"][:2] == ["positional", "required"]
    assert eval_rows["--batch-size / --data.eval-batch-size"][0] == "{None}|INT"


def test_a_cell_keeps_its_pipes_and_angle_brackets_as_text():
    md = reference.command_markdown("x", reference.parsers()["train"], "doc")
    line = next(li for li in md.splitlines() if li.startswith("| <code>--work-dir"))
    assert line.count(" | ") == 3  # four cells: no pipe of {None}|PATH splits one
    assert "<code>{None}&#124;PATH</code>" in line and "work_dirs/&lt;name>" in line


def test_the_home_page_is_the_readme_with_site_links():
    text = reference.readme_markdown(
        "[a](docs/guides/runs.md#x) [b](#results) [c](benchmarks/RESULTS.md) [d](https://x.org)")
    assert text == "[a](guides/runs.md#x) [b](#results) c [d](https://x.org)"


# ---- every command the docs show parses -------------------------------------------------

def _code(page) -> list[str]:
    """Shell lines of a page's fenced blocks (continuations joined) and its inline commands."""
    text = page.read_text()
    lines = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("bash", "sh", "console", "shell", ""):
            lines += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`((?:\S+=\S+ )*convnext-cifar [^`]+)`", prose)
    return lines


def _invocations(line: str) -> list[list[str]]:
    """The argument lists given to convnext-cifar on one shell line (directly, through
    `python -m convnext_cifar` or torchrun), after env assignments and prompts."""
    line = line.strip().removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, current = [], None
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            if current is not None:
                found.append(current)
            current = None
        elif current is not None:
            current.append(word)
        elif word.endswith("convnext-cifar") or word == "convnext_cifar" or (
                word.startswith("$(which convnext-cifar")):
            current = []
    return found


def _docs_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for line in _code(page):
            out += [(f"{page.relative_to(ROOT)}: {line.strip()}", args)
                    for args in _invocations(line) if args and not args[0].startswith("--tyro")]
    return out


DOCS_COMMANDS = _docs_commands()


def test_the_docs_show_commands_of_every_kind():
    shown = {args[0] for _, args in DOCS_COMMANDS}
    assert set(cli.commands(cli.PRESETS[cli.DEFAULT_PRESET]())) <= shown
    assert len(DOCS_COMMANDS) > 60


@pytest.mark.parametrize("where,args", DOCS_COMMANDS, ids=[w[:90] for w, _ in DOCS_COMMANDS])
def test_every_command_in_the_docs_parses(where, args, tmp_path, monkeypatch):
    """Through the real parser, as `convnext-cifar ARGS` parses it; nothing runs (the parsed
    command is not called), except `--print-config`, which only prints."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.json"  # a `--config FILE` shown in the docs: a saved config
    config.write_text(json.dumps(to_dict(cli.PRESETS[cli.DEFAULT_PRESET]())))
    args = [str(config) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]
    # a run the docs resume (work_dirs/NAME) is not on this machine: the option's value is
    # checked when the run starts; `auto` parses the same way and needs no run
    args = ["auto" if i and args[i - 1] == "--resume" else a for i, a in enumerate(args)]
    if args == ["--version"]:
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            default = (cli.starting_config(args) if args[0] in ("train", "tune")
                       else cli.PRESETS[cli.DEFAULT_PRESET]())
            parse(cli.commands(default), args)
    except UserError as e:
        raise AssertionError(f"{where}\n  -> {e}") from None


# flags of other tools the docs show beside ours: pip, torchrun, the benchmark scripts, and
# timm's train.py in the option map of docs/guides/migrating.md (its first column)
OTHER_TOOLS = {"--index-url", "--no-deps", "--standalone", "--nproc-per-node", "--work",
               "--budget-s", "--dry"}


def _timm_flags() -> set[str]:
    table = (DOCS / "guides" / "migrating.md").read_text()
    first = [row.split(" | ")[0] for row in table.splitlines() if row.startswith("| `")]
    return set(re.findall(r"--[a-z][\w-]*", " ".join(first)))


def test_every_option_the_docs_name_exists():
    """An option named in prose (`--data.root`) or in any docs code is one the CLI has: a
    renamed option fails here instead of going stale in a guide."""
    known = set(OTHER_TOOLS) | _timm_flags()
    for parser in reference.parsers().values():
        for action in parser._actions:
            known.update(action.option_strings)
    named = set()
    for page in PAGES:
        text = page.read_text()
        named.update((page.name, o) for o in  # every dotted option, anywhere
                     re.findall(r"(?<![\w-])--[a-z]+\.[a-z][\w-]*[a-z0-9]", text))
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            named.update((page.name, o) for o in  # and any option in an inline code span
                         re.findall(r"(?<![\w-])--[a-z][\w-]*[a-z0-9](?![\w.])", span))
    assert sorted(n for n in named if n[1] not in known) == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="the docs extra")
def test_the_site_builds_strict_with_every_option_on_its_reference_page(tmp_path):
    site = tmp_path / "site"
    # no -q: mkdocs' quiet mode drops the warnings --strict would fail on (a link out of docs/)
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = (site / "reference" / "index.html").read_text()
    assert _help_options("train") - set(re.findall(r"--[a-z][\w.-]*[a-z]", page)) == set()
    home = (site / "index.html").read_text()
    assert "Quickstart" in home and 'href="guides/runs/"' in home  # the README, site links
