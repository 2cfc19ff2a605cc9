"""A suite's work in a process of its own: `python -m MODULE`, given its configuration as JSON on stdin,
answering with one JSON event a line on stdout ({"event": ..., ...}), read as they come.

Each event is kept with the time it was received (`received`, time.monotonic()); a "say" event's line,
anything on stdout that is not JSON, and stderr are kept too (the last 30 lines: `output`), to show
when the process fails. A subclass hears of each event (`on_event`) and of the end of stdout
(`on_end`: the process ended, whoever waits should find out).
"""
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque

from django.conf import settings


class ChildProcess:
    def __init__(self, module, config):
        self.module = module
        self.process = subprocess.Popen([sys.executable, "-m", module], cwd=settings.BASE_DIR, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.events, self.output = [], deque(maxlen=30)
        self.readers = [threading.Thread(target=self._read_events, daemon=True),
                        threading.Thread(target=self._read_errors, daemon=True)]
        for reader in self.readers:
            reader.start()
        self.process.stdin.write(json.dumps(config, default=str))
        self.process.stdin.close()

    def on_event(self, event):
        """An event, as it arrives (it is in `events` already)."""

    def on_end(self):
        """The process closed its stdout: it ended."""

    def _read_events(self):
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self.output.append(line.rstrip())
                continue
            event["received"] = time.monotonic()
            self.events.append(event)
            if event["event"] == "say":
                self.output.append(event["line"])
            self.on_event(event)
        self.on_end()

    def _read_errors(self):
        for line in self.process.stderr:
            self.output.append(line.rstrip())
