"""The SAE: one type for TopK and ReLU encoders (``model``), its file formats (Qwen-Scope,
the 9B release, SAELens folders, cached repos), and reconstruction metrics. Imports torch."""
