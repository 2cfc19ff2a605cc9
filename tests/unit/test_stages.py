"""The backfill's stage clocks: busy and waiting time per stage, and the stage that limits a run."""
import time

from segments.switch.backfill.stages import StageClock, limiting_stage, stage_figures


def test_a_clock_adds_each_block_to_what_it_was_doing():
    clock = StageClock()
    with clock.timing("busy"):
        time.sleep(0.02)
    with clock.timing("waiting_for_input"):
        pass
    assert clock.busy >= 0.02 and clock.waiting_for_input < clock.busy and clock.waiting_for_room == 0


def test_the_busiest_stage_per_thread_limits_the_run():
    clocks = {
        "claim": [StageClock(busy=1.0, waiting_for_room=8.0)],
        "encode": [StageClock(busy=3.0, waiting_for_input=6.0)],
        "write": [StageClock(busy=9.0), StageClock(busy=8.0)],  # two sessions: 17 s of 20 s
    }
    figures = stage_figures(clocks, 10.0)
    assert figures["write"] == {"threads": 2, "busy_s": 17.0, "waiting_for_input_s": 0.0, "waiting_for_room_s": 0.0,
                                "busy_share": 0.85}
    assert figures["encode"]["busy_share"] == 0.3
    assert limiting_stage(figures) == "write"
    assert limiting_stage({}) is None
