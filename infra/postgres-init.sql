-- Run once, when PostgreSQL initialises its data volume (infra/compose.yaml): Label Studio's database is
-- POSTGRES_DB (labelstudio); MLflow's tracking and registry store gets its own.
CREATE DATABASE mlflow;
