"""What a served model is and how a request becomes an answer (used by services/)."""
