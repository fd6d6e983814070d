"""SAM-2 backend, embedding cache, PCSW prompt generation and the pseudo-label refresh. Imports sam2 lazily."""
