-- Multi-region: each field that any region may change carries the version of its last write, a
-- hybrid-logical-clock timestamp and the writing region (see src/region/hlc.rs), compared as
-- text; a write applies only if its version is greater. '' is older than every version.
ALTER TABLE users ADD COLUMN display_name_v TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN status_text_v TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN avatar_url_v TEXT NOT NULL DEFAULT '';
ALTER TABLE rooms ADD COLUMN name_v TEXT NOT NULL DEFAULT '';
ALTER TABLE rooms ADD COLUMN topic_v TEXT NOT NULL DEFAULT '';
