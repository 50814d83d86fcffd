"""Studies: measurements that are not LongBench runs but share kvbench's models, engine and results store.
`kvbench.studies.sensitivity` is the context-truncation sensitivity study (`kvbench sensitivity`);
`kvbench.studies.recipes` holds the paper recipes (`kvbench recipes`, `run --recipe`, `table --recipe`)."""
