"""Every `isdr` subcommand explains itself."""

import subprocess
from pathlib import Path
import sys

import pytest

from relay.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[2]

SUBCOMMANDS = ["run", "scp", "operator", "job", "echo", "fingerprint", "fingerprint convert", "fingerprint check", "fingerprint test",
               "series", "series list", "series retry", "series rematch", "series cancel",
               "emulator", "sample", "sample ct", "sample small"]


def test_the_command_list_is_complete():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(choices) == {name.split()[0] for name in SUBCOMMANDS}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: isdr " + command) and len(out.splitlines()) > 3


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "run" in capsys.readouterr().out


def test_a_bad_setting_is_a_clear_error_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "relay.cli", "run"], env={"SCP_PORT": "eleven", "PATH": ""},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SCP_PORT='eleven': expected a whole number" in result.stderr and "Traceback" not in result.stderr


def test_devtools_commands_come_from_the_devtools_distribution():
    # `isdr emulator` and `isdr sample` are registered by isdr-devtools (devtools/pyproject.toml),
    # not by the product: the image built from the `isdr` wheel does not carry them.
    from importlib.metadata import entry_points

    registered = {ep.name: ep.value for ep in entry_points(group="isdr.commands")}
    assert registered == {"emulator": "isdr_devtools.emulator.cli:add_parser",
                          "sample": "isdr_devtools.synthetic:add_parser"}
    product = (REPO_ROOT / "pyproject.toml").read_text()
    assert "isdr_devtools" not in product.split("[tool.setuptools.packages.find]")[1]
    assert "cryptography" not in product.split("[project.optional-dependencies]")[0]


@pytest.mark.parametrize("command", ["emulator", "sample"])
def test_a_devtool_that_is_not_installed_is_named_with_how_to_install_it(command, monkeypatch, capsys):
    import relay.cli

    monkeypatch.setattr(relay.cli, "entry_points", lambda group: [])
    assert main([command, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"isdr {command}" in err and "development tool" in err and "pip install ./devtools" in err
