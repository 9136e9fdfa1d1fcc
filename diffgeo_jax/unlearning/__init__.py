"""Unlearning concepts from text-to-image models: DUO (arXiv 2407.21035)."""
