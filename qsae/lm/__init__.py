"""The language model side: loading (with the embedded GGUF model), residual/MLP hooks, the
seeded sampler, question and text datasets, fine-tuning, and the device-side conversion of
activations to the lake dtype. Imports torch and transformers."""
