"""Files: reading safetensors checkpoints and adapters, writing shards, the output folder, side files, the Hub.

Readers know nothing of writers; the facts both need about the safetensors format live in formats.py.
"""
