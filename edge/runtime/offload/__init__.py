"""The offload engine: dense weights resident, experts read from the expert store into per-layer
caches (moe.policies decides evictions), prefetch, HEBF bits, memory budgets and the elastic
manager. Opened with exact slots (a plan's) or sized from a budget (moe.sizing)."""
