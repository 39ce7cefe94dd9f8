"""Planning: the pure planner (model x device x budget -> Plan) and the cost formulas it shares
with the profiler's probes. May import: moe, quant, spec, units, errors, hardware; no runtime,
no I/O."""
