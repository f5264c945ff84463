-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d).
CREATE ROLE loyalty LOGIN PASSWORD 'loyalty';
-- Read-only, for Grafana's PostgreSQL data source: the metrics migrations grant it SELECT (api_keys excepted).
CREATE ROLE loyalty_reader LOGIN PASSWORD 'loyalty_reader' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE loyalty_ledger OWNER loyalty;
CREATE DATABASE loyalty_rules OWNER loyalty;
CREATE DATABASE loyalty_metrics OWNER loyalty;
