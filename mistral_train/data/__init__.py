"""Training data: read rows (sources), tokenize (text, sft, preference), audit, pack or pad, batch (batches).
Importing the package loads nothing: config.py reads only its schema (data/spec.py)."""
