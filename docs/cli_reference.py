"""The CLI reference, generated when the site is built (an MkDocs hook, see mkdocs.yml).

Every command, every option, its type, default and help come from the parser tyro builds out of
the config dataclasses, their field docstrings and the commands' signatures: the very parser
`convnext-cifar` runs, so the page cannot drift from the command line. `docs/reference.md`
holds the marker this replaces; tests/test_docs.py checks that every option is listed.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

MARKER = "<!-- cli-reference -->"


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by name, as the console script builds it."""
    import tyro.extras

    from convnext_cifar.cli import DEFAULT_PRESET, commands
    from convnext_cifar.presets import PRESETS

    with warnings.catch_warnings():  # get_parser is marked deprecated; it is tyro's own parser
        warnings.simplefilter("ignore", DeprecationWarning)
        return {name: tyro.extras.get_parser(command)
                for name, command in commands(PRESETS[DEFAULT_PRESET]()).items()}


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str]]:
    """(option names, type, default, help) of every argument but --help, in the parser's order."""
    rows = []
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        text = " ".join((action.help or "").split())
        head, said, tail = text.rpartition(" (default: ")  # tyro appends it to the help
        if said and tail.endswith(")"):
            text, default = head, tail[:-1]
        else:
            default = "required" if action.required else ""
        text = text.removesuffix(" (required)")
        if action.option_strings:
            names = " / ".join(action.option_strings)
            kind = "flag" if action.nargs == 0 else str(action.metavar or action.dest.upper())
        else:  # a positional argument
            names = str(action.metavar or action.dest)
            kind = "positional" + (", one or more" if action.nargs in ("+", "*") else "")
        rows.append((names, kind, default, text))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def _prose(text: str) -> str:
    """Help text as table-cell Markdown: no HTML, emphasis or cell breaks from its characters."""
    return _cell(text.replace("&", "&amp;").replace("<", "&lt;").replace("*", r"\*"))


def _code(text: str) -> str:
    """Code in a table cell: HTML, since a pipe escaped inside backticks stays a backslash."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "&#124;")
    return f"<code>{escaped}</code>" if text else ""


def _section(names: str) -> str:
    """The config section an option belongs to: model, data, optim... or the command's own."""
    first = names.split(" / ")[0]
    return first[2:].split(".")[0] if first.startswith("--") and "." in first else ""


def command_markdown(name: str, parser: argparse.ArgumentParser, doc: str) -> str:
    lines = [f"## `{name}`", "", doc, "", f"```text\nconvnext-cifar {name} --help\n```", ""]
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    rows = option_rows(parser)
    for row in rows:  # train's and tune's many options in their config sections
        sections.setdefault(_section(row[0]) if len(rows) > 30 else "", []).append(row)
    for section, rows in sections.items():
        if section:
            lines += [f"### `{name}`: `--{section}.*`", ""]
        lines += ["| option | type | default | what it does |", "| --- | --- | --- | --- |"]
        lines += [f"| {'<br>'.join(map(_code, n.split(' / ')))} | {_code(k.replace(',', ', '))} "
                  f"| {_code(d)} | {_prose(h)} |" for n, k, d, h in rows]
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """Every command, in the order `convnext-cifar --help` lists them."""
    from convnext_cifar.cli import DEFAULT_PRESET, commands
    from convnext_cifar.presets import PRESETS

    docs = {name: " ".join((fn.__doc__ or "").split("\n\n")[0].split())
            for name, fn in commands(PRESETS[DEFAULT_PRESET]()).items()}
    return "\n".join(command_markdown(name, parser, docs[name])
                     for name, parser in parsers().items())


README_MARKER = "<!-- readme -->"
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def readme_markdown(readme: str) -> str:
    """The README as the site's home page: links into docs/ become links within the site,
    anchors stay, and a link to a repository file outside the site becomes its plain text."""
    def link(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if target.startswith(("#", "http://", "https://")):
            return m.group(0)
        if target.startswith("docs/"):
            return f"[{text}]({target.removeprefix('docs/') or 'index.md'})"
        return text

    return _LINK.sub(link, readme)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference_markdown())
    if README_MARKER in markdown:
        readme = Path(config["config_file_path"]).parent / "README.md"
        markdown = markdown.replace(README_MARKER, readme_markdown(readme.read_text()))
    return markdown
