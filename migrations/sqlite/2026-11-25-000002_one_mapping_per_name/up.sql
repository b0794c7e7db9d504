-- One mapping per name and owner: a second mapping of the same `from` (system-wide, or for the
-- same user) could never apply, since the oldest always matched first. Duplicates made before
-- this are dropped, keeping the one that was in force.
DELETE FROM model_mappings
WHERE id NOT IN (
    SELECT MIN(id) FROM model_mappings GROUP BY from_pattern, COALESCE(user_id, '')
);
CREATE UNIQUE INDEX model_mappings_from_owner
    ON model_mappings (from_pattern, (COALESCE(user_id, '')));
