"""Deterministic, realistic transcript segments for trying the switch without production data.

The texts are assembled from phrases about the show's subjects (diet, metabolism, health) in
the loose style of spoken transcripts, at realistic and varied lengths, with the edge cases real
data has: a very long segment, a blank one, emoji and non-ASCII text. Like a real talk, a video
stays on its subjects: it has two or three, taken in turn through the video, with an aside to
another now and then, so that the segments of one moment of a video are about the same thing
(what the evaluation's stored-vector mode looks for, segments/evaluation/neighbours.py). The legacy 1536-dim
vectors are random unit vectors (the old model cannot run here): they take the space real ones
take, and mean nothing. Or, with an encoder (`load_demo_segments --legacy-model PATH`), a model's
vectors of the texts, so that the old column can be searched (a blank text gets none).

Rows are written with one binary COPY, so 100,000 segments load in seconds.
"""
import io
import json
import random
import struct

import numpy as np

LEGACY_DIMENSIONS = 1536
HOST = "Chaffee"
GUEST = "GUEST"

SUBJECTS = [
    "a carnivore diet", "ketosis", "insulin resistance", "LDL cholesterol", "red meat",
    "autoimmune disease", "oxalates in spinach", "plant defence chemicals", "intermittent fasting",
    "seed oils", "fibre", "gut health", "depression and diet", "inflammation", "vitamin C",
    "scurvy", "electrolytes", "sodium", "weight loss", "type 2 diabetes", "blood sugar",
    "triglycerides", "organ meats", "liver", "eggs", "butter", "saturated fat", "heart disease",
    "sleep quality", "joint pain", "eczema", "migraines", "athletic performance", "muscle mass",
    "ageing", "cancer risk", "processed food", "sugar cravings", "alcohol", "kidney stones",
]
OPENERS = [
    "So", "Well", "You know,", "Look,", "Honestly,", "Right, so", "And", "Now,", "The thing is,",
    "I mean,", "Okay, so", "What we see is",
]
CLAIMS = [
    "people come to me worried about {s}, and the first thing I ask is what they actually eat",
    "the studies on {s} are mostly observational, and that tells you very little about cause",
    "when you cut out plants, {s} often gets better within a few weeks",
    "{s} is not the villain it was made out to be in the nineteen-eighties",
    "a lot of patients noticed a change in {s} after they stopped eating sugar",
    "the mainstream advice on {s} has not held up when you look at the trials",
    "we evolved eating animals, and {s} makes a lot more sense in that light",
    "if you measure {s} before and after, the numbers tell a pretty clear story",
    "my own experience with {s} was a turning point, back when I was racing",
    "I get asked about {s} every single week, so let me go through it carefully",
    "the question with {s} is always compared to what, and on what diet",
    "there is this idea that you need {s}, and I just do not see evidence for it",
    "for most people {s} improves when insulin comes down",
    "you have to give it time with {s}, adaptation can take a couple of months",
]
ASIDES = [
    "which surprised a lot of people", "and that is an important point", "right",
    "at least in my clinical experience", "if you read the paper closely",
    "and the guest I had on last month said the same thing", "you know what I mean",
    "and I think that matters", "which the headlines never mention",
]
GUEST_LINES = [
    "in my practice I saw the same thing with {s}",
    "can you explain why {s} improves so quickly",
    "we ran the numbers on {s} in our patients and were honestly shocked",
    "my story with {s} started about ten years ago",
    "what would you say to someone who is scared about {s}",
]
EDGE_CASES = [
    "   ",
    "🥩🥩🥩 steak, eggs and butter 🧈 — that's the whole menu! 💪",
    "Le régime carnivore, ça marche? Ja, sehr gut — ¿y el colesterol? 肉食 диета",
    "النظام الغذائي اللاحم meat-only diet עם בשר בלבד",
]


def _sentence(rng, speaker, subject=None):
    subject = subject or rng.choice(SUBJECTS)
    line = rng.choice(GUEST_LINES if speaker == GUEST else CLAIMS).format(s=subject)
    text = f"{rng.choice(OPENERS)} {line}"
    if rng.random() < 0.35:
        text += f", {rng.choice(ASIDES)}"
    return text + rng.choice([".", ".", ".", "?", "..."])


def _text(rng, speaker, subject=None):
    # Spoken segments: mostly one to three sentences, now and then a long monologue stretch.
    sentences = min(1 + int(rng.expovariate(0.7)), 12)
    return " ".join(_sentence(rng, speaker, subject and subject()) for _ in range(sentences))


def _subjects_of_video(rng, n):
    """For each of a video's `n` segments, a function giving a sentence's subject: the video's current
    subject mostly (its two or three subjects in turn), another of its subjects or any now and then."""
    topics = rng.sample(SUBJECTS, rng.randint(2, 3))

    def at(position):
        current = topics[min(len(topics) - 1, position * len(topics) // n)]

        def subject():
            draw = rng.random()
            return current if draw < 0.8 else rng.choice(topics) if draw < 0.95 else rng.choice(SUBJECTS)
        return subject
    return at


def generate_texts(n, seed=0):
    """`n` transcript-like texts (no edge cases), the same for the same seed."""
    rng = random.Random(seed)
    return [_text(rng, HOST if rng.random() < 0.85 else GUEST) for _ in range(n)]


def _video_id(rng):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(rng.choice(alphabet) for _ in range(11))


def generate_segments(count, seed=0):
    """Yield `count` segment rows as dicts, videos in order, timestamps increasing per video."""
    rng = random.Random(seed)
    videos = max(1, min(600, count // 5))
    per_video = [count // videos + (1 if i < count % videos else 0) for i in range(videos)]
    edge_at = {rng.randrange(count): text for text in EDGE_CASES} if count >= 50 else {}
    if count >= 50:
        edge_at[rng.randrange(count)] = " ".join(_text(rng, HOST) for _ in range(400))  # very long
    index = 0
    for n in per_video:
        video_id = _video_id(rng)
        interview = rng.random() < 0.3
        clock = rng.uniform(0, 5)
        subjects = _subjects_of_video(rng, n)
        for position in range(n):
            speaker = GUEST if interview and rng.random() < 0.4 else HOST
            text = edge_at.get(index) or _text(rng, speaker, subjects(position))
            duration = max(1.0, len(text.split()) / rng.uniform(2.2, 3.2))
            yield {
                "video_id": video_id,
                "start_sec": round(clock, 2),
                "end_sec": round(clock + duration, 2),
                "text": text,
                "speaker_label": speaker,
                "speaker_confidence": round(rng.uniform(0.6, 0.99), 3),
                "avg_logprob": round(rng.uniform(-0.6, -0.1), 3),
                "compression_ratio": round(rng.uniform(1.2, 2.4), 3),
                "no_speech_prob": round(rng.uniform(0.0, 0.1), 4),
                "temperature_used": 0.0 if rng.random() < 0.9 else 0.2,
                "metadata": {"source": "demo", "language": "en"},
                "video_type": "interview" if interview else "monologue",
            }
            clock += duration + rng.uniform(0.1, 1.5)
            index += 1


# Binary COPY: the columns written, and how each value is packed.
COLUMNS = [
    "video_id", "start_sec", "end_sec", "text", "speaker_label", "speaker_confidence",
    "avg_logprob", "compression_ratio", "no_speech_prob", "temperature_used", "metadata",
    "video_type",
]
_TEXT = {"video_id", "text", "speaker_label", "video_type"}


def _field(name, value):
    if value is None:
        return struct.pack(">i", -1)
    if name in _TEXT:
        data = value.encode()
    elif name == "metadata":
        data = b"\x01" + json.dumps(value).encode()  # jsonb binary format, version 1
    else:
        data = struct.pack(">d", value)
    return struct.pack(">i", len(data)) + data


def copy_payload(rows, legacy_vectors=None, type_name="vector"):
    """Binary COPY data for `rows` (plus a vector column when legacy vectors are given: one per
    row, None for none; float16 values for a `halfvec` column)."""
    out = io.BytesIO()
    out.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
    fields = len(COLUMNS) + (legacy_vectors is not None)
    for i, row in enumerate(rows):
        out.write(struct.pack(">h", fields))
        for name in COLUMNS:
            out.write(_field(name, row[name]))
        if legacy_vectors is not None:
            out.write(_vector(legacy_vectors[i], type_name))
    out.write(struct.pack(">h", -1))
    out.seek(0)
    return out


def _vector(vector, type_name):
    if vector is None:
        return struct.pack(">i", -1)
    data = np.asarray(vector).astype(">f2" if type_name == "halfvec" else ">f4").tobytes()
    return struct.pack(">ihh", 4 + len(data), len(vector), 0) + data


def model_vectors(encoder, rows):
    """`encoder`'s vectors of the rows' texts, None for a blank text (nothing to embed)."""
    texts = [row["text"] for row in rows]
    written = [i for i, text in enumerate(texts) if text.strip()]
    vectors = [None] * len(texts)
    for i, vector in zip(written, encoder.encode_documents([texts[i] for i in written])):
        vectors[i] = vector
    return vectors


def legacy_vectors(count, seed=0):
    """Random unit vectors standing in for the old model's 1536-dim output."""
    vectors = np.random.default_rng(seed).standard_normal((count, LEGACY_DIMENSIONS), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def load(cursor, count, seed=0, legacy_column=None, chunk=20_000, encoder=None, type_name="vector"):
    """Insert `count` demo segments through `cursor` (psycopg2), in chunks of binary COPY.

    With `legacy_column`, each row also gets a legacy vector in that column (of SQL type
    `type_name`): a simulated one, or `encoder`'s vector of its text when an encoder is given.
    """
    rows = generate_segments(count, seed)
    columns = COLUMNS + ([legacy_column] if legacy_column else [])
    sql = f"COPY segments ({', '.join(columns)}) FROM STDIN WITH (FORMAT binary)"
    for start in range(0, count, chunk):
        batch = [next(rows) for _ in range(min(chunk, count - start))]
        if not legacy_column:
            vectors = None
        elif encoder is not None:
            vectors = model_vectors(encoder, batch)
        else:
            vectors = legacy_vectors(len(batch), seed + start)
        cursor.copy_expert(sql, copy_payload(batch, vectors, type_name))
