"""What a CREATE INDEX of the project runs with (maintenance_work_mem, parallel workers), and why.

An HNSW index builds quickly only while its whole graph fits in maintenance_work_mem. Once it is
full, pgvector says "hnsw graph no longer fits into maintenance_work_mem after N tuples" and
inserts every remaining row into the on-disk index one by one, many times slower. So the build is
sized to the graph it will hold.

The graph (pgvector 0.8: src/hnsw.h, src/hnswutils.c, src/hnswbuild.c; 64-bit) holds, per row
with a vector, one element made of these allocations, each rounded up to 8 bytes:

    HnswElementData                   128 bytes
    its list of neighbour arrays      8 × (level + 1)
    the layer-0 neighbour array       8 + 16 × 2m   (a 16-byte HnswCandidate per neighbour)
    one array per upper layer         8 + 16 × m
    the value                         vector(d): 8 + 4d bytes; halfvec(d): 8 + 2d

An element's level is floor(-ln(U) / ln(m)), so it has 1/(m - 1) upper layers on average. A
serial build allocates from a memory context that adds an 8-byte header to each allocation, and
its graph may fill maintenance_work_mem; a parallel build allocates maintenance_work_mem at
once as one shared memory segment, keeps 3 MB of it for other uses and reports 1 MB less, and
adds no headers. For m = 16 that is 2,251 bytes per vector(384) serially (2,218 in parallel) and
1,483 per halfvec(384) (1,450). tests/db/test_index_build.py builds real indexes with a small
maintenance_work_mem and checks the estimate against the row count pgvector's NOTICE gives
(measured: within 0.5%).

`plan()` chooses, each with the reason it gives:

- maintenance_work_mem: settings.INDEX_MAINTENANCE_WORK_MEM when set. Otherwise ("auto") the
  estimated graph plus HEADROOM (rows that arrive during the build) plus what a parallel build
  keeps for itself; never less than the server's own value, and never more than
  settings.INDEX_MAINTENANCE_WORK_MEM_MAX (8GB by default, the value pgvector's README suggests
  for large builds: SQL cannot read how much memory the host has, so the operator sets the
  ceiling). An index that is not HNSW (the legacy IVFFlat rebuild, whose k-means holds its
  sample in memory) gets OTHER_INDEX_MEMORY, within the same bounds.
- max_parallel_maintenance_workers: settings.INDEX_PARALLEL_WORKERS when set. Otherwise the
  server's max_parallel_maintenance_workers or WORKERS (whichever is larger), within
  max_parallel_workers (the pool every parallel operation draws from) and max_worker_processes
  minus one (the logical replication launcher's slot). pgvector asks for all of them, or none
  for a table smaller than min_parallel_table_scan_size; when none can be started, the build is
  serial.

When the graph does not fit in what the build will use, `BuildPlan.warning` says so before the
build starts (`embedding_switch index`, `embedding_status`, and the build's own output).
"""
import math
import re
from dataclasses import asdict, dataclass

from django.conf import settings

from askdrchaffee.postgres import human_bytes

from segments.storage import STORAGES

MB = 2**20
POINTER, ALIGNMENT = 8, 8  # pgvector's relative/absolute pointers; MAXALIGN on 64-bit servers
ELEMENT_BYTES = 128  # sizeof(HnswElementData)
CANDIDATE_BYTES = 16  # sizeof(HnswCandidate)
NEIGHBOR_ARRAY_HEADER = 8  # offsetof(HnswNeighborArray, items)
CHUNK_HEADER = 8  # a Generation memory context's header per allocation (serial builds, PostgreSQL 15+)
PARALLEL_KEPT = 3 * MB + MB  # of a parallel build's shared segment: 3 MB for other uses, 1 MB not reported

HEADROOM = 0.25  # more memory than the estimate: rows inserted during the build, PostgreSQL < 15's larger headers
OTHER_INDEX_MEMORY = 2**30  # for an index that is not HNSW (the value every build used before sizing)
WORKERS = 7  # pgvector's README: "SET max_parallel_maintenance_workers = 7; -- plus leader"
POSTGRES_MAX_KB = 2**31 - 1  # maintenance_work_mem's upper bound (MAX_KILOBYTES)

_TYPE = re.compile(r"(vector|halfvec)\((\d+)\)")
_SERVER = """
    SELECT pg_size_bytes(current_setting('maintenance_work_mem')),
           current_setting('max_parallel_maintenance_workers')::int,
           current_setting('max_parallel_workers')::int, current_setting('max_worker_processes')::int
"""
_COLUMN = """
    SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
    WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped
"""


def _aligned(size):
    return -(-size // ALIGNMENT) * ALIGNMENT


def value_bytes(value_type):
    """Bytes of one value of `value_type` ("vector(384)", "halfvec(384)"), as pgvector stores it."""
    match = _TYPE.fullmatch(value_type or "")
    if match is None:
        raise ValueError(f"{value_type!r} is not a vector(d) or halfvec(d) type: no HNSW graph estimate for it.")
    return STORAGES[match[1]].value_bytes(int(match[2]))


def element_bytes(value_size, m, parallel=False):
    """Average bytes of one HNSW graph element (module docstring), a value of `value_size` bytes."""
    per_allocation = 0 if parallel else CHUNK_HEADER
    upper_layers = 1 / (m - 1)  # expected levels above layer 0
    layer0 = _aligned(NEIGHBOR_ARRAY_HEADER + CANDIDATE_BYTES * 2 * m) + per_allocation
    upper = _aligned(NEIGHBOR_ARRAY_HEADER + CANDIDATE_BYTES * m) + per_allocation
    neighbor_list = POINTER * (1 + upper_layers) + per_allocation  # a multiple of 8: no rounding
    return (ELEMENT_BYTES + per_allocation + neighbor_list + layer0 + upper_layers * upper
            + _aligned(value_size) + per_allocation)


def graph_capacity(maintenance_work_mem, parallel=False):
    """Bytes of graph a build with `maintenance_work_mem` bytes holds before it goes to disk."""
    if not parallel:
        return maintenance_work_mem
    area = maintenance_work_mem - 3 * MB if maintenance_work_mem > 3 * MB else maintenance_work_mem
    return max(0, area - MB)


@dataclass(frozen=True)
class GraphEstimate:
    table: str
    column: str
    value_type: str  # the indexed values' type, e.g. "vector(384)"
    rows: int  # rows with a vector
    m: int
    bytes_per_element: float  # a serial build's (the larger)
    bytes: int

    def fits(self, maintenance_work_mem, parallel):
        return self.bytes <= graph_capacity(maintenance_work_mem, parallel)


def column_type(cursor, table, column):
    """The SQL type of `table`.`column` as format_type writes it ("vector(384)"), or None."""
    cursor.execute(_COLUMN, [table, column])
    row = cursor.fetchone()
    return row[0] if row else None


def estimate(cursor, table, column, m, rows=None, opclass=None):
    """The HNSW graph of `table`.`column` (its rows with a vector; `rows` when already counted).

    An index with a halfvec operator class over a vector column stores halfvec values."""
    value_type = column_type(cursor, table, column)
    if value_type is None:
        raise ValueError(f"{table}.{column} does not exist: no HNSW graph estimate for it.")
    if (opclass or "").startswith("halfvec") and value_type.startswith("vector("):
        value_type = "half" + value_type
    per_element = element_bytes(value_bytes(value_type), m)
    if rows is None:
        quoted = '"' + column.replace('"', '""') + '"'
        cursor.execute(f"SELECT count({quoted}) FROM {table}")
        rows = cursor.fetchone()[0]
    return GraphEstimate(table, column, value_type, rows, m, round(per_element, 1), math.ceil(rows * per_element))


@dataclass(frozen=True)
class BuildPlan:
    maintenance_work_mem: int  # bytes
    maintenance_work_mem_why: str
    parallel_workers: int
    parallel_workers_why: str
    server: dict  # the server's own maintenance_work_mem and worker limits
    estimate: GraphEstimate | None  # None: not an HNSW build

    @property
    def fits(self):
        """Whether the estimated graph fits (None: nothing estimated)."""
        if self.estimate is None:
            return None
        return self.estimate.fits(self.maintenance_work_mem, self.parallel_workers > 0)

    def session_settings(self):
        """The values to SET for the build's session."""
        return {"maintenance_work_mem": f"{self.maintenance_work_mem // 1024}kB",
                "max_parallel_maintenance_workers": str(self.parallel_workers)}

    @property
    def warning(self):
        """A sentence for the operator when the graph will not fit, else None."""
        if self.fits is not False:
            return None
        graph = self.estimate
        return (f"The HNSW graph of {graph.rows:,} {graph.value_type} values needs about {human_bytes(graph.bytes)}, more "
                f"than the maintenance_work_mem of {human_bytes(self.maintenance_work_mem)} the build will use: once it is "
                "full, pgvector builds the rest on disk, many times slower. Raise INDEX_MAINTENANCE_WORK_MEM_MAX (or "
                "set INDEX_MAINTENANCE_WORK_MEM) to about "
                f"{human_bytes(required_memory(graph.bytes, self.parallel_workers))} if the server has that much memory "
                "free.")

    def describe(self, name="the index"):
        """One sentence saying what the build of `name` runs with, and why."""
        return (f"Building {name} with maintenance_work_mem = {human_bytes(self.maintenance_work_mem)} "
                f"({self.maintenance_work_mem_why}) and max_parallel_maintenance_workers = {self.parallel_workers} "
                f"({self.parallel_workers_why}).")

    def as_dict(self):
        return {**asdict(self), "fits": self.fits, "warning": self.warning,
                "session_settings": self.session_settings()}


def required_memory(graph_bytes, workers):
    """maintenance_work_mem for a graph of `graph_bytes` plus HEADROOM, in whole MB."""
    needed = graph_bytes * (1 + HEADROOM) + (PARALLEL_KEPT if workers else 0)
    return math.ceil(needed / MB) * MB


def server_limits(cursor):
    cursor.execute(_SERVER)
    memory, maintenance_workers, parallel_workers, worker_processes = cursor.fetchone()
    return {"maintenance_work_mem": memory, "max_parallel_maintenance_workers": maintenance_workers,
            "max_parallel_workers": parallel_workers, "max_worker_processes": worker_processes}


def plan(cursor, table=None, column=None, m=None, rows=None, opclass=None):
    """The BuildPlan of a CREATE INDEX on `table`; an HNSW one when `column` is given (`m` its
    parameter, `rows` the rows with a vector when already counted)."""
    from segments.models import HNSW_M

    server = server_limits(cursor)
    graph = estimate(cursor, table, column, m or HNSW_M, rows, opclass) if column else None
    workers, workers_why = _workers(server)
    memory, memory_why = _memory(server, graph, workers)
    return BuildPlan(memory, memory_why, workers, workers_why, server, graph)


def _workers(server):
    if settings.INDEX_PARALLEL_WORKERS is not None:
        return settings.INDEX_PARALLEL_WORKERS, "INDEX_PARALLEL_WORKERS"
    own = server["max_parallel_maintenance_workers"]
    pool, processes = server["max_parallel_workers"], server["max_worker_processes"]
    chosen = max(0, min(max(WORKERS, own), pool, processes - 1))
    return chosen, (f"the larger of {WORKERS} and the server's {own}, within max_parallel_workers = {pool} and "
                    f"max_worker_processes - 1 = {processes - 1}; none for a table under "
                    "min_parallel_table_scan_size")


def _memory(server, graph, workers):
    if settings.INDEX_MAINTENANCE_WORK_MEM is not None:
        return settings.INDEX_MAINTENANCE_WORK_MEM, "INDEX_MAINTENANCE_WORK_MEM"
    own, ceiling = server["maintenance_work_mem"], settings.INDEX_MAINTENANCE_WORK_MEM_MAX
    if graph is None:
        wanted, what = OTHER_INDEX_MEMORY, "not an HNSW index: the memory every build had before sizing"
    else:
        wanted = required_memory(graph.bytes, workers)
        what = (f"the estimated graph: {graph.rows:,} × {graph.value_type} at {graph.bytes_per_element:,.0f} bytes "
                f"= {human_bytes(graph.bytes)}, plus {HEADROOM:.0%} headroom"
                + (" and 4 MB for a parallel build" if workers else ""))
    if wanted <= own:
        return own, f"the server's own value, which holds {what}"
    if wanted > ceiling:
        return max(own, ceiling), f"INDEX_MAINTENANCE_WORK_MEM_MAX = {human_bytes(ceiling)}; it needs {human_bytes(wanted)}: {what}"
    return min(wanted, POSTGRES_MAX_KB * 1024), what
