"""Reports from result records: RobustBench model_info files, leaderboards, the paper's table, plots.

Reads records only; never imports the attacks or the runner (and so never torch)."""
