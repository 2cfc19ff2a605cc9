"""The application's own triggers on `segments`, and keeping the switch's writes out of them.

A table the original project built may carry triggers of its own, such as a BEFORE UPDATE
trigger stamping `updated_at = now()`. The switch's write sessions (the backfill writer, the
swap's catch-up, the contract's clearing) change nothing but vector columns; firing such a
trigger on each row they write would rewrite data the application owns (every segment's
`updated_at` would become the time of the backfill). So each of their transactions starts with
`quiet_user_triggers(cursor)`: where user triggers fire on its writes, it sets
`session_replication_role = replica` for that transaction only (`SET LOCAL`: on a connection a
pooler shares, a session setting would reach the application's transactions), under which
triggers in their default state (ENABLE, or `tgenabled = 'O'`) do not fire. The application's
own sessions are untouched: its writes fire them as before.

Setting it needs a superuser or, on PostgreSQL 15 and later, `GRANT SET ON PARAMETER
session_replication_role TO <role>`; `quiet_user_triggers` refuses with that fix rather than
let the triggers fire. Replica mode also stops foreign-key checks in that transaction, which is why
only sessions that write nothing but vectors may use it.
"""
from dataclasses import dataclass

from django.core.management.base import CommandError

from askdrchaffee.postgres import set_local
from segments import triggers
from segments.schema import FIRST_NEXT, LIVE, NEXT, PREVIOUS, TABLE

PARAMETER = "session_replication_role"
PARAMETER_ACL_SINCE = 150000  # GRANT SET ON PARAMETER (PostgreSQL 15)

# pg_trigger.tgtype bits (PostgreSQL's include/catalog/pg_trigger.h)
_ROW, _BEFORE, _INSERT, _DELETE, _UPDATE, _TRUNCATE, _INSTEAD = 1, 2, 4, 8, 16, 32, 64

# The vector columns the switch writes at one phase or another.
SWITCH_COLUMNS = frozenset({LIVE, FIRST_NEXT, NEXT, PREVIOUS})


class TriggersNotQuieted(CommandError):
    """The session may not set session_replication_role, and user triggers would fire."""


@dataclass(frozen=True)
class UserTrigger:
    name: str
    enabled: str  # pg_trigger.tgenabled: O (origin and local: the default), A (always), R (replica), D (disabled)
    type_bits: int
    update_columns: tuple  # UPDATE OF these columns only; () for any UPDATE
    definition: str

    @property
    def fires_on_vector_writes(self):
        """True if an UPDATE that sets only vector columns fires it (in origin mode)."""
        if self.enabled == "D" or not self.type_bits & _UPDATE:
            return False
        return not self.update_columns or bool(SWITCH_COLUMNS & set(self.update_columns))

    @property
    def quieted_by_replica(self):
        """True if session_replication_role = replica keeps it from firing."""
        return self.enabled == "O"

    @property
    def when(self):
        timing = "INSTEAD OF" if self.type_bits & _INSTEAD else "BEFORE" if self.type_bits & _BEFORE else "AFTER"
        events = [name for bit, name in ((_INSERT, "INSERT"), (_UPDATE, "UPDATE"), (_DELETE, "DELETE"),
                                         (_TRUNCATE, "TRUNCATE")) if self.type_bits & bit]
        return f"{timing} {' OR '.join(events)}"


_USER_TRIGGERS = """
    SELECT t.tgname, t.tgenabled, t.tgtype,
           ARRAY(SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = t.tgrelid AND a.attnum = ANY (t.tgattr::int2[]) ORDER BY a.attnum),
           pg_get_triggerdef(t.oid)
    FROM pg_trigger t
    WHERE t.tgrelid = to_regclass(%s) AND NOT t.tgisinternal AND t.tgname <> ALL(%s)
    ORDER BY t.tgname
"""


def user_triggers_query():
    """(SQL, parameters) of user_triggers(), for a message of several reads (askdrchaffee.round_trips.reads)."""
    return _USER_TRIGGERS, [TABLE, list(triggers.PROJECT_TRIGGERS)]


def user_triggers(cursor, rows=None):
    """The UserTriggers on `segments` (as search_path resolves it): not internal ones (foreign
    keys), not the project's own staleness trigger. From `rows` of user_triggers_query() when given."""
    if rows is None:
        cursor.execute(*user_triggers_query())
        rows = cursor.fetchall()
    return [UserTrigger(name, enabled, bits, tuple(columns), definition)
            for name, enabled, bits, columns, definition in rows]


def to_quiet(cursor, rows=None):
    """The user triggers the switch's writes would fire and replica mode keeps quiet (`rows`: user_triggers())."""
    return [t for t in user_triggers(cursor, rows) if t.fires_on_vector_writes and t.quieted_by_replica]


@dataclass(frozen=True)
class Privilege:
    """Whether this session's role may set session_replication_role, and the fix if not."""

    permitted: bool
    role: str
    server_version_num: int

    @property
    def fix(self):
        if self.server_version_num >= PARAMETER_ACL_SINCE:
            return f"as a superuser: GRANT SET ON PARAMETER {PARAMETER} TO {self.role};"
        return (f"PostgreSQL {self.server_version_num // 10000} lets only superusers set {PARAMETER}: run the "
                "switch's commands as a superuser (or upgrade to PostgreSQL 15 or later and GRANT SET ON "
                f"PARAMETER {PARAMETER} TO {self.role})")


def replication_role_privilege(cursor):
    """The Privilege of this session's role (current_user) over session_replication_role."""
    cursor.execute(
        "SELECT current_user, current_setting('server_version_num')::int, rolsuper FROM pg_roles "
        "WHERE rolname = current_user"
    )
    role, version, superuser = cursor.fetchone()
    if superuser or version < PARAMETER_ACL_SINCE:
        return Privilege(superuser, role, version)
    cursor.execute("SELECT has_parameter_privilege(%s, 'SET')", [PARAMETER])
    return Privilege(cursor.fetchone()[0], role, version)


def triggers_to_quiet(cursor, rows=None):
    """The user triggers that would fire on the switch's writes; TriggersNotQuieted, naming the GRANT
    to run, when some would and the session's role may not set session_replication_role. (`rows`: those
    of user_triggers_query(), read already.)"""
    quiet = to_quiet(cursor, rows)
    if not quiet:
        return []
    privilege = replication_role_privilege(cursor)
    if not privilege.permitted:
        raise TriggersNotQuieted(
            f"The trigger(s) {', '.join(t.name for t in quiet)} on {TABLE} would fire on every row the switch "
            f"writes (and change the application's data, such as updated_at), and role {privilege.role} may not "
            f"set {PARAMETER} to keep them quiet. Nothing was written. Fix: {privilege.fix}"
        )
    return quiet


def quiet_for_this_transaction(cursor):
    """`session_replication_role = replica` until the end of the current transaction only: on a
    connection a pooler shares, a session setting would reach the application's transactions."""
    set_local(cursor, session_replication_role="replica")


def quiet_user_triggers(cursor):
    """Keep the application's triggers on `segments` from firing on this transaction's writes.

    Call it at the start of every transaction of the switch that writes only vector columns. Does
    nothing when no user trigger would fire; returns the names of the triggers quieted. Raises
    TriggersNotQuieted, naming the GRANT to run, when the role may not set session_replication_role.
    """
    quiet = triggers_to_quiet(cursor)
    if quiet:
        quiet_for_this_transaction(cursor)
    return [t.name for t in quiet]
