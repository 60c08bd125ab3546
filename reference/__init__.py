"""reference: exact, test-first LLM fundamentals (converters, unified model, inference, training)."""

__version__ = "0.1.0"
