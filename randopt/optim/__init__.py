"""Optimizers: a functional AdamW core under thin stateful classes."""
