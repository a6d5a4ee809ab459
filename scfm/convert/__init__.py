"""Converters from published checkpoint layouts (Geneformer / HF BERT, ...) to scfm models."""
