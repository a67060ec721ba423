"""What every job stands on: the tasks table, run folders, result files, pseudonyms and hardware settings."""
