"""Weight formats: nested-bit expert quantization and BitStack decomposition (issues 3 and 5)."""
