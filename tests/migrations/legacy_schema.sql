-- The segments table of the existing Ask Dr Chaffee database, before the model switch.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE segments (
    id serial PRIMARY KEY,
    video_id varchar(255) NOT NULL,
    start_sec float NOT NULL,
    end_sec float NOT NULL,
    text text NOT NULL,
    speaker_label varchar(50),
    speaker_confidence float,
    embedding vector(1536),
    avg_logprob float,
    compression_ratio float,
    no_speech_prob float,
    temperature_used float,
    metadata jsonb,
    created_at timestamp NOT NULL DEFAULT current_timestamp,
    video_type varchar(20)
);
CREATE INDEX idx_segments_video_id ON segments (video_id);
CREATE INDEX idx_segments_speaker_label ON segments (speaker_label);
CREATE INDEX idx_segments_video_start ON segments (video_id, start_sec);
CREATE INDEX idx_segments_video_type ON segments (video_type);
CREATE INDEX segments_embedding_idx ON segments USING ivfflat (embedding vector_l2_ops) WITH (lists = 100);
