"""Weight formats: nested-bit ("matryoshka") expert records and the expert store file that holds
them, BitStack decomposition and its stack file. Quantization is offline; the runtime consumes.
May import: formats, memory, spec, units, errors and edge's native helper."""
