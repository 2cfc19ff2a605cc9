#!/usr/bin/env python
"""Django's command-line utility for administrative tasks.

A command that cannot connect for a reason to fix in the settings (a certificate, sslmode, the
host, the password: askdrchaffee.postgres.connection_refusal) ends with that one line and exit
status 1, not a traceback (--traceback shows it); so does runserver, whose checks run in a thread.
"""
import os
import sys
import threading


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "askdrchaffee.settings")
    from django.core.management import execute_from_command_line

    from askdrchaffee.postgres import connection_refusal

    threading.excepthook = in_one_line(threading.excepthook, connection_refusal)
    try:
        execute_from_command_line(sys.argv)
    except Exception as exc:
        line = connection_refusal(exc)
        if line is None or "--traceback" in sys.argv:
            raise
        sys.exit(f"CommandError: {line}")


def in_one_line(hook, connection_refusal):
    """A threading.excepthook that writes a connection refusal as its one line, and leaves any
    other error to `hook`."""
    def excepthook(args):
        line = connection_refusal(args.exc_value)
        if line is None or "--traceback" in sys.argv:
            return hook(args)
        print(f"CommandError: {line}", file=sys.stderr)

    return excepthook


if __name__ == "__main__":
    main()
