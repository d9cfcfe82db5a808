"""Decisions around the model: routing, acquisition, consensus, promotion, retraining, drift, triage."""
