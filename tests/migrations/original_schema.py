"""The `segments` table as the original project built it (original_project_schema.sql), with
realistic rows, and a checksum of everything in them but the vectors."""
import json
import random
from pathlib import Path

import pytest
from django.db import connection

from segments import demo_data
from segments.demo import drop_segments

ORIGINAL_SQL = (Path(__file__).parent / "original_project_schema.sql").read_text()
VECTOR_COLUMNS = ("embedding", "embedding_384", "embedding_next", "embedding_legacy")
BLANK_AT = 17  # the row whose text is blank


def execute(statement, params=None):
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else None


def drop_original():
    """Drop the original project's tables, function and view, and `segments` with all the
    switch built for it."""
    drop_segments()
    execute("DROP TABLE IF EXISTS sources, api_cache, alembic_version; "
            "DROP FUNCTION IF EXISTS segments_set_updated_at();")


@pytest.fixture
def original_table(segments_at):
    """original_table() drops `segments` and creates the original project's DDL in its place
    (segments.0001 unapplied, as in a database this project has never touched); the final
    phase of the project's own table is restored afterwards."""

    def build():
        drop_original()
        execute(ORIGINAL_SQL)

    yield build
    drop_original()


def _rows(count, seed):
    rng = random.Random(seed)
    texts = list(dict.fromkeys(demo_data.generate_texts(count * 2, seed)))[: count - 1]
    texts.insert(BLANK_AT, "   ")
    videos = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
                      for _ in range(11)) for _ in range(count // 10 + 1)]
    vectors = demo_data.legacy_vectors(count, seed)
    clock = {}
    for i, text in enumerate(texts):
        video = videos[i // 10]
        start = clock.get(video, rng.uniform(0, 5))
        end = round(start + max(1.0, len(text.split()) / 2.6), 2)
        clock[video] = end + rng.uniform(0.1, 1.5)
        created = f"2025-10-{1 + i % 9:02d} {8 + i % 12:02d}:{i % 60:02d}:17.{rng.randrange(10**6):06d}"
        guest = i // 10 % 3 == 1 and rng.random() < 0.4
        yield (
            video, round(start, 2), end, text, "GUEST" if guest else "Chaffee", round(rng.uniform(0.6, 0.99), 3),
            "[" + ",".join(f"{x:.7g}" for x in vectors[i]) + "]",
            round(rng.uniform(-0.6, -0.1), 3), round(rng.uniform(1.2, 2.4), 3), round(rng.uniform(0, 0.1), 4),
            0.0, json.dumps({"source": "youtube", "asr": "whisper-large-v3"}), created,
            json.dumps([round(rng.gauss(0, 0.1), 5) for _ in range(192)]),
            "interview" if i // 10 % 3 == 1 else "monologue",
            rng.choice([None, False, True]), rng.random() < 0.1, rng.random() < 0.05,
            f"2025-11-{1 + i % 20:02d} 03:{i % 60:02d}:41.{rng.randrange(10**6):06d}",
        )


def load_rows(count=60, seed=5):
    """`count` segments written as the original project's ingestion would have: legacy 1536-dim
    vectors, voice embeddings, timestamps in the past, one blank text."""
    with connection.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO segments (video_id, start_sec, end_sec, text, speaker_label, speaker_conf, embedding,
                avg_logprob, compression_ratio, no_speech_prob, temperature_used, metadata, created_at,
                voice_embedding, video_type, re_asr, is_overlap, needs_refinement, updated_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s::vector, %s, %s, %s, %s, %s::jsonb, %s, %s::jsonb, %s, %s, %s, %s, %s)
            """,
            list(_rows(count, seed)),
        )


def data_columns():
    """Every column of `segments` but the vector columns."""
    rows = execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'segments'::regclass AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum"
    )
    return [name for (name,) in rows if name not in VECTOR_COLUMNS]


def checksums(columns):
    """{id: md5 of the row's `columns` as text}."""
    listed = ", ".join(f'"{name}"' for name in columns)
    return dict(execute(f"SELECT id, md5(ROW({listed})::text) FROM segments ORDER BY id"))
