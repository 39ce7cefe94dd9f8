"""Expert analysis with no engine in it: routing traces, locality (SRP, SCH), cache policies and
the one eviction implementation, the cache simulator built on it, cache sizing, plots.
May import: spec, units, errors only (numpy aside)."""
