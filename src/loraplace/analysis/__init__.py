"""Results in, statistics, plots and the report out."""
