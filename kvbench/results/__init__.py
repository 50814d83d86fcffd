"""Results: the row schema and fingerprints (schema), the append-only store and its lock (store, lock), which rows
may share a table (selection), comparison tables (report), paired statistics (stats), the regression gate's compare,
the one table renderer (render), and plots."""
