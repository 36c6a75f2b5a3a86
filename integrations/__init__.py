"""Integrations with optional third-party tools, importable as ``randopt.integrations``.

Each submodule imports its tool lazily; the core library never imports this package.
"""
