"""The README's command line reference matches the typer apps."""

from tests.cli_reference import README, commands, readme_with_reference


def test_cli_reference_is_current():
    readme = README.read_text()
    assert readme == readme_with_reference(readme), "run `python -m tests.cli_reference` and commit the README"


def test_every_option_and_variable_is_in_the_readme():
    readme = README.read_text()
    for command_line, command in commands():
        assert f"#### `{command_line}`" in readme
        for param in command.params:
            if param.name == "help" or param.hidden:
                continue
            names = [param.name.upper()] if param.param_type_name == "argument" else param.opts
            assert param.envvar in readme and all(f"`{name}`" in readme for name in names), param.name
