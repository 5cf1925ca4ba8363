"""A study: its runs planned (`prepare`), each one's contract written (`spec`), and run here
(`local`, `worker`) or on a Ray cluster (`ray`), by `runner.run_study`."""
