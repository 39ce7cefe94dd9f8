"""Everything about experts: routing traces, locality metrics, expert store and cache (issue 3)."""
