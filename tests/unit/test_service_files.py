"""The follower's service files in docs/deploy/: each parses, and runs the command the project has."""
import configparser
import re
import shlex

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "docs" / "deploy"


def follow_arguments(command_line):
    """The arguments after `manage.py` in `command_line`, checked against the command's own parser."""
    import django

    django.setup()
    from segments.management.commands.backfill_embeddings import Command

    words = shlex.split(command_line) if isinstance(command_line, str) else list(command_line)
    arguments = words[words.index("manage.py") + 1:]
    assert arguments[0] == "backfill_embeddings"
    options = Command().create_parser("manage.py", "backfill_embeddings").parse_args(arguments[1:])
    return options


def test_the_systemd_unit_restarts_the_follower_and_stops_it_with_sigterm():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "askdrchaffee-follower.service")

    service = unit["Service"]
    assert follow_arguments(service["ExecStart"]).follow is True
    assert service["Restart"] == "on-failure" and int(service["RestartSec"]) > 0
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 5
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_the_procfile_has_a_follower_process():
    lines = [line for line in (DEPLOY / "Procfile").read_text().splitlines() if line and not line.startswith("#")]
    processes = dict(re.fullmatch(r"([a-z]+): (.+)", line).groups() for line in lines)

    assert follow_arguments(processes["follower"]).follow is True


def test_the_compose_service_restarts_the_follower_and_stops_it_with_sigterm():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())

    follower = compose["services"]["follower"]
    assert follow_arguments(follower["command"]).follow is True
    assert follower["restart"] == "unless-stopped" and follower["stop_signal"] == "SIGTERM"
