-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d).
-- loyalty_owner owns the databases and runs the migrations; the services connect as loyalty, which the
-- migrations grant row access only (INSERT and SELECT on ledger.entries).
CREATE ROLE loyalty LOGIN PASSWORD 'loyalty';
CREATE ROLE loyalty_owner LOGIN PASSWORD 'loyalty_owner';
-- Read-only, for Grafana's PostgreSQL data source: the metrics migrations grant it SELECT (api_keys excepted).
CREATE ROLE loyalty_reader LOGIN PASSWORD 'loyalty_reader' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE loyalty_ledger OWNER loyalty_owner;
CREATE DATABASE loyalty_rules OWNER loyalty_owner;
CREATE DATABASE loyalty_metrics OWNER loyalty_owner;
