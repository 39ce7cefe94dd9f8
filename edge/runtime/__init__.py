"""Executing a model: every engine behind the Backend protocol (the numpy reference, llama.cpp,
the offload engine in offload/), ggml kernels through ctypes, tokenizers, the generation loop.
May import: moe, quant, formats and below; never plan (the SDK hands the runtime a plan's
numbers), build, device, the SDK or the CLI."""
