"""`embedding_switch pause` / `resume` through the database, and what `embedding_status` and the admin
say while the switch's writes wait (a pause, a worker waiting for a replica)."""
import json
import uuid
from datetime import timedelta

import pytest
from django.core.management.base import CommandError
from django.utils import timezone

from segments.models import BackfillWorker, SwitchEvent, SwitchPause
from segments.switch import status, steps, throttle
from segments.switch.backfill.session import worker_name
from tests.embeddings.conftest import add_segments, command
from tests.readme import manage_args, sh_block_after

pytestmark = pytest.mark.django_db(transaction=True)

SWITCH_PAGE = "/admin/segments/embeddingswitch/"


def test_the_pause_table_is_the_models():
    assert SwitchPause._meta.db_table == throttle.PAUSE_TABLE


def test_pause_and_resume_say_what_they_did_and_what_comes_next_and_each_can_be_run_again():
    out, _ = command("embedding_switch", "pause", "--reason", "peak traffic")
    assert out.startswith("Paused: every backfill worker and contract, on every machine, holds its writes back "
                          "from its next batch (within 2 s)")
    assert "Next: `python manage.py embedding_switch resume`." in out
    assert "next: python manage.py embedding_switch resume (the switch's bulk writes are paused by " \
           f"{worker_name()} since " in out
    pause = SwitchPause.objects.get()
    assert (pause.scope, pause.paused_by, pause.reason) == ("all", worker_name(), "peak traffic")

    again, _ = command("embedding_switch", "pause", "--reason", "something else")
    assert again.startswith(f"Already paused by {worker_name()} since ") and "(peak traffic); nothing changed." in again
    assert SwitchPause.objects.get().reason == "peak traffic"

    out, _ = command("embedding_switch", "resume")
    assert out.startswith(f"Resumed: the writes paused by {worker_name()} since ")
    assert not SwitchPause.objects.exists()
    again, _ = command("embedding_switch", "resume")
    assert again.startswith("Not paused; nothing changed.")
    assert [event.step for event in SwitchEvent.objects.filter(step__in=("pause", "resume"))] == ["pause", "resume"]


def test_pause_as_json():
    out, _ = command("embedding_switch", "pause", "--json")
    result = json.loads(out)
    assert (result["step"], result["done"], result["details"]["by"]) == ("pause", True, worker_name())


def test_while_paused_the_status_says_who_since_when_why_and_that_resume_comes_next():
    add_segments(["one", "two"])
    steps.pause(reason="replica maintenance", by="ops-host:4242")

    found = status.collect()

    pause = found["pause"]
    assert (pause["by"], pause["reason"]) == ("ops-host:4242", "replica maintenance")
    assert pause["sentence"] == f"paused by ops-host:4242 since {pause['since']} UTC (replica maintenance)"
    assert found["next"]["command"] == "python manage.py embedding_switch resume"
    assert found["next"]["why"].startswith(f"the switch's bulk writes are {pause['sentence']}")
    assert any(warning.startswith("The switch's bulk writes are paused by ops-host:4242") for warning in
               found["warnings"])
    text, _ = command("embedding_status")
    assert f"Paused: the switch's bulk writes are {pause['sentence']}; `python manage.py embedding_switch " \
           "resume` lets them go on." in text
    assert "Next: python manage.py embedding_switch resume" in text
    assert json.loads(command("embedding_status", "--json")[0])["pause"] == pause

    steps.resume()
    assert status.collect()["pause"] is None
    assert status.collect()["next"]["command"] != "python manage.py embedding_switch resume"


def live_worker(waiting_for):
    now = timezone.now()
    return BackfillWorker.objects.create(id=uuid.uuid4(), worker_name="gpu-box:7001", rows_done=4000,
                                         started=now - timedelta(seconds=30), updated=now, mode="backfill",
                                         column="embedding", waiting_for=waiting_for)


def test_a_worker_waiting_for_a_replica_is_shown_with_the_reason():
    live_worker("replica 'standby1' at 10.0.0.7 is 3.4 s behind (limit 2 s)")

    [worker] = status.collect()["backfill"]["workers"]

    assert worker["waiting_for"] == "replica 'standby1' at 10.0.0.7 is 3.4 s behind (limit 2 s)"
    text, _ = command("embedding_status")
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("gpu-box:7001"))
    assert lines[at + 1] == "    waiting: replica 'standby1' at 10.0.0.7 is 3.4 s behind (limit 2 s)"


def test_a_worker_that_writes_shows_no_wait():
    live_worker("")
    [worker] = status.collect()["backfill"]["workers"]
    assert worker["waiting_for"] == ""
    assert "waiting:" not in command("embedding_status")[0]


def test_the_admin_panel_shows_the_pause_and_each_workers_wait(admin_client):
    live_worker("paused by ops-host:4242 since 2026-12-06 12:03:04 UTC (peak traffic)")
    steps.pause(reason="peak traffic", by="ops-host:4242")

    html = admin_client.get(SWITCH_PAGE).content.decode()

    assert 'id="switch-pause"' in html and "<strong>ops-host:4242</strong>" in html and "peak traffic" in html
    assert "<code>python manage.py embedding_switch resume</code>" in html
    assert ('<td class="waiting-for"><span class="pill warn">paused by ops-host:4242 since 2026-12-06 12:03:04 UTC '
            "(peak traffic)</span></td>") in html

    steps.resume()
    html = admin_client.get(SWITCH_PAGE).content.decode()
    assert 'id="switch-pause"' not in html


def test_the_readme_commands_run_as_written():
    """The README's "Going easy on the live site" block: pause and resume run; the throttle's options parse."""
    from django.core.management import load_command_class

    commands = [manage_args(argv) for argv in sh_block_after("## Going easy on the live site")]
    assert [args[:2] for args in commands] == [("embedding_switch", "pause"), ("embedding_switch", "resume"),
                                               ("backfill_embeddings", "--max-rows-per-second"),
                                               ("embedding_switch", "contract")]
    command(*commands[0])
    assert SwitchPause.objects.get().reason == "peak traffic"
    command(*commands[1])
    assert not SwitchPause.objects.exists()
    for name, *args in commands[2:]:
        parsed = load_command_class("segments", name).create_parser("manage.py", name).parse_args(args)
        assert parsed.max_rows_per_second in (1000.0, 2000.0)
    assert vars(load_command_class("segments", "backfill_embeddings").create_parser(
        "manage.py", "backfill_embeddings").parse_args(commands[2][1:]))["max_replica_lag"] == 1.0


def test_an_unknown_step_is_refused():
    with pytest.raises(CommandError):
        command("embedding_switch", "hold")
