"""Files: readers and writers of formats others define (Hugging Face safetensors checkpoints,
GGUF), edge's own bundle manifest and weight file, and the canonical in-memory weights they all
produce. May import: spec, units, errors, memory and the llama.cpp library helpers only."""
