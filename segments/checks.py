"""The pre-flight check of the live `segments` table as Django system checks.

Registered with the `database` tag: `manage.py check --database default` runs it, and so does
`manage.py migrate` before it changes anything. An ERROR finding of segments/switch/preflight.py
becomes a checks.Error (the command stops), a WARNING a checks.Warning; INFO findings are left
to the report itself. Each carries the finding's fix as its hint, and an id from its code
(segments.E007 is `embedding_type`).
"""
from django.core import checks

from segments.switch import preflight

KINDS = {preflight.ERROR: (checks.Error, "E"), preflight.WARNING: (checks.Warning, "W")}


def segments_table(app_configs=None, databases=None, **kwargs):
    """The pre-flight findings for each database the command was given."""
    from segments.models import Segment

    messages = []
    for alias in databases or ():
        for finding in preflight.inspect(using=alias).findings:
            if finding.level not in KINDS:
                continue
            kind, letter = KINDS[finding.level]
            where = "" if alias == "default" else f"[database {alias}] "
            messages.append(kind(where + finding.message, hint=finding.fix or None, obj=Segment,
                                 id=f"segments.{letter}{finding.number:03d}"))
    return messages
