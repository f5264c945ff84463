-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d).
CREATE ROLE loyalty LOGIN PASSWORD 'loyalty';
CREATE DATABASE loyalty_ledger OWNER loyalty;
CREATE DATABASE loyalty_rules OWNER loyalty;
CREATE DATABASE loyalty_metrics OWNER loyalty;
