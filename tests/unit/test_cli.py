"""Every `isdr` subcommand explains itself."""

import subprocess
import sys

import pytest

from relay.cli import build_parser, main

SUBCOMMANDS = ["run", "scp", "operator", "job", "fingerprint", "fingerprint convert", "fingerprint check",
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
