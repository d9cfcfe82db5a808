"""Ray jobs (fine-tuning, batch scoring, evaluation, site adaptation) composed from the library."""
