"""The pre-flight check: the live `segments` table compared with what the project needs.

(Being written: a first version that finds nothing to refuse.)
"""
from dataclasses import dataclass, field

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    level: str  # ERROR (the project cannot serve the table), WARNING, INFO
    code: str
    message: str
    fix: str = ""


@dataclass
class Report:
    findings: list = field(default_factory=list)

    @property
    def blocking(self):
        return [f for f in self.findings if f.level == ERROR]

    def as_text(self, only_blocking=False):
        shown = self.blocking if only_blocking else self.findings
        return "\n".join(f"  [{f.level}] {f.message}" + (f"\n      fix: {f.fix}" if f.fix else "") for f in shown)


def inspect(using="default"):
    """The Report for the live table (no table yet: nothing to report)."""
    return Report()
