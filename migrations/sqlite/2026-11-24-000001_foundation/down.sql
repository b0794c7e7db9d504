DROP TABLE meta;
DROP TABLE request_logs;
DROP TABLE usage_records;
DROP TABLE prices;
DROP TABLE model_mappings;
DROP TABLE upstream_keys;
DROP TABLE user_keys;
DROP TABLE users;
