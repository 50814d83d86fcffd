"""Results: the append-only store, comparison tables, paired statistics, the regression gate's compare,
and plots."""
