"""The README and docs/ stay true: the CLI reference and the settings table match the code, every link resolves, the
README is short."""

import re
from pathlib import Path

from tests.cli_reference import CLI_DOC, TRAINING_DOC, commands, with_reference, with_settings_table

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 400  # issue 23: the README is for users; measurements and detail live in docs/
# [text](target) and <img src="target">; a target names a file (a dot or a slash in it), so that math such as
# W1[K_w](t) is not taken for a link
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]*[./][^)\s]*)\)|<img [^>]*src=\"([^\"]+)\"")
CITED_DOC = re.compile(r"`(docs/[\w./-]+)`")  # a file of docs/ named in backticks, such as `docs/PROTOCOL.md`


def test_cli_reference_is_current():
    text = CLI_DOC.read_text()
    assert text == with_reference(text), "run `python -m tests.cli_reference` and commit docs/CLI.md"


def test_training_settings_table_is_current():
    text = TRAINING_DOC.read_text()
    assert text == with_settings_table(text), "run `python -m tests.cli_reference` and commit docs/TRAINING.md"


def test_every_option_and_variable_is_in_the_cli_reference():
    text = CLI_DOC.read_text()
    for command_line, command in commands():
        assert f"#### `{command_line}`" in text
        for param in command.params:
            if param.name == "help" or param.hidden:
                continue
            names = [param.name.upper()] if param.param_type_name == "argument" else param.opts
            assert param.envvar in text and all(f"`{name}`" in text for name in names), param.name


def test_every_relative_link_points_to_an_existing_file():
    broken = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in LINK.finditer(text):
            target = (match[1] or match[2]).split("#", 1)[0]
            if target and "://" not in target and not target.startswith("mailto:"):
                if not (document.parent / target).exists():
                    broken.append(f"{document.relative_to(ROOT)}: {target}")
        for cited in CITED_DOC.findall(text):
            if not (ROOT / cited).exists():
                broken.append(f"{document.relative_to(ROOT)}: `{cited}`")
    assert not broken, broken


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines; move detail into docs/"
