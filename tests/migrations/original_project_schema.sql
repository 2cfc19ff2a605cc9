-- The Ask Dr Chaffee database as the original project's own history built it, which is not
-- what migration segments.0001 creates. Its Alembic revisions, applied in order:
--   001           sources, segments (embedding as float8[]), api_cache; idx_segments_* indexes
--   002           UNIQUE (video_id, text) as uq_segments_video_text
--   003           embedding becomes vector(1536); IVFFlat vector_l2_ops, lists = 153; comment
--   70e48355c89e  voice_embedding jsonb (192-dim speaker vectors) with a GIN index
--   004           video_type varchar(20) and idx_segments_video_type
--   008           speaker_confidence renamed speaker_conf; re_asr, is_overlap, needs_refinement
-- then, from its older plain-SQL lineage, `updated_at` with its BEFORE UPDATE trigger and a
-- view over segments.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE alembic_version (
    version_num varchar(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version (version_num) VALUES ('008');

-- 001
CREATE TABLE sources (
    id serial NOT NULL,
    source_id varchar(255) NOT NULL,
    source_type varchar(50) NOT NULL,
    title text,
    url text,
    channel_name varchar(255),
    channel_url text,
    published_at timestamp,
    duration_s integer,
    view_count integer,
    like_count integer,
    comment_count integer,
    description text,
    thumbnail_url text,
    tags jsonb,
    metadata jsonb,
    status varchar(50) DEFAULT 'pending' NOT NULL,
    error_message text,
    created_at timestamp DEFAULT CURRENT_TIMESTAMP NOT NULL,
    last_updated timestamp DEFAULT CURRENT_TIMESTAMP NOT NULL,
    processed_at timestamp,
    PRIMARY KEY (id),
    CONSTRAINT unique_source UNIQUE (source_type, source_id)
);
COMMENT ON COLUMN sources.source_id IS 'video_id or unique identifier';
COMMENT ON COLUMN sources.source_type IS 'youtube, zoom, local, etc.';
COMMENT ON COLUMN sources.duration_s IS 'Duration in seconds';
COMMENT ON COLUMN sources.metadata IS 'Processing metadata, model info, etc.';
COMMENT ON COLUMN sources.status IS 'pending, processing, completed, failed';

CREATE TABLE segments (
    id serial NOT NULL,
    video_id varchar(255) NOT NULL,
    start_sec float NOT NULL,
    end_sec float NOT NULL,
    text text NOT NULL,
    speaker_label varchar(50),
    speaker_confidence float,
    embedding float[],
    avg_logprob float,
    compression_ratio float,
    no_speech_prob float,
    temperature_used float,
    metadata jsonb,
    created_at timestamp DEFAULT CURRENT_TIMESTAMP NOT NULL,
    PRIMARY KEY (id)
);
COMMENT ON COLUMN segments.video_id IS 'References source_id in sources table';
COMMENT ON COLUMN segments.speaker_label IS 'Chaffee, GUEST, or NULL';
COMMENT ON COLUMN segments.speaker_confidence IS 'Voice verification confidence [0-1]';
COMMENT ON COLUMN segments.embedding IS '1536-dim vector for semantic search';
COMMENT ON COLUMN segments.avg_logprob IS 'Whisper confidence metric';
COMMENT ON COLUMN segments.compression_ratio IS 'Whisper quality metric';
COMMENT ON COLUMN segments.no_speech_prob IS 'Probability of no speech';
COMMENT ON COLUMN segments.temperature_used IS 'Whisper temperature parameter';
COMMENT ON COLUMN segments.metadata IS 'Additional segment metadata';

CREATE TABLE api_cache (
    id serial NOT NULL,
    cache_key varchar(255) NOT NULL,
    etag varchar(255),
    data jsonb,
    expires_at timestamp,
    created_at timestamp DEFAULT CURRENT_TIMESTAMP NOT NULL,
    PRIMARY KEY (id),
    UNIQUE (cache_key)
);

CREATE INDEX idx_segments_video_id ON segments (video_id);
CREATE INDEX idx_segments_speaker ON segments (speaker_label);
CREATE INDEX idx_segments_time ON segments (video_id, start_sec);
CREATE INDEX idx_sources_lookup ON sources (source_type, source_id);
CREATE INDEX idx_sources_status ON sources (status);
CREATE INDEX idx_sources_updated ON sources (last_updated);

-- 002
ALTER TABLE segments ADD CONSTRAINT uq_segments_video_text UNIQUE (video_id, text);

-- 003 (EMBEDDING_DIMENSIONS=1536: lists = max(100, min(1000, 1536 // 10)) = 153)
ALTER TABLE segments ALTER COLUMN embedding TYPE vector(1536) USING embedding::vector(1536);
CREATE INDEX segments_embedding_idx ON segments USING ivfflat (embedding vector_l2_ops) WITH (lists = 153);
COMMENT ON COLUMN segments.embedding IS
    'Text embedding vector for semantic search (1536-dim, from EMBEDDING_DIMENSIONS env var)';

-- 70e48355c89e
ALTER TABLE segments ADD COLUMN voice_embedding jsonb;
COMMENT ON COLUMN segments.voice_embedding IS
    '192-dim SpeechBrain ECAPA voice embedding for speaker identification';
CREATE INDEX idx_segments_voice_embedding ON segments USING gin (voice_embedding);

-- 004
ALTER TABLE segments ADD COLUMN IF NOT EXISTS video_type varchar(20);
CREATE INDEX IF NOT EXISTS idx_segments_video_type ON segments (video_type);
COMMENT ON COLUMN segments.video_type IS
    'Video classification: monologue (1 speaker, ~100% accuracy), interview (2+ speakers >15% guest, ~63% accuracy), or monologue_with_clips (2+ speakers <15% guest)';

-- 008
ALTER TABLE segments RENAME COLUMN speaker_confidence TO speaker_conf;
ALTER TABLE segments ADD COLUMN re_asr boolean;
ALTER TABLE segments ADD COLUMN is_overlap boolean;
ALTER TABLE segments ADD COLUMN needs_refinement boolean;

-- The older plain-SQL lineage: every update stamps updated_at, and a view the application reads.
ALTER TABLE segments ADD COLUMN updated_at timestamp DEFAULT now();
CREATE FUNCTION segments_set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END
$$;
CREATE TRIGGER segments_set_updated_at BEFORE UPDATE ON segments
    FOR EACH ROW EXECUTE FUNCTION segments_set_updated_at();
CREATE VIEW segments_with_video AS
    SELECT id, video_id, start_sec, text, embedding FROM segments;
