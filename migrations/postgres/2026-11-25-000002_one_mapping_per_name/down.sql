DROP INDEX model_mappings_from_owner;
