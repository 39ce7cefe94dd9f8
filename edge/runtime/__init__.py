"""Executing a model: the reference engine, backends, tokenizers and the generation loop."""
