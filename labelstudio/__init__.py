"""Label Studio integration: label configs, project bootstrap, task export and annotation sync."""
