"""loragate: adapter-aware load-balancing gateway for multi-tenant LoRA serving on vLLM."""

__version__ = "0.1.0"
