"""The analyses' math, no I/O: feature-rivalry statistics (``rivalry``) and base-vs-fine-tuned
feature matching (``matching``). numpy/scipy only."""
