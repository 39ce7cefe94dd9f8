"""Everything that writes a bundle: checkpoint or GGUF -> gguf | edge | offload bundles, with the
calibration and locality measurement and BitStack stack building they need.
May import: runtime (to route calibration text), moe, quant, formats and below; never plan,
device, the SDK or the CLI."""
