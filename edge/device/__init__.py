"""Measuring the device: the hardware profiler, storage probes, probes that time a runtime, and the
sourced device profiles (hw-profiles/, installed with the package).
May import: plan.costs (formulas, never the planner's decisions), build (probe models), runtime,
and everything below; never the SDK or the CLI."""
