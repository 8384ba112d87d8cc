"""Benchmarks run from a checkout (not shipped in the wheel): `benchmarks/peers.py` compares
this project's train step with timm's and the Keras examples' on the same CPU."""
