"""The benchmark: `python -m bench [--quick] [--scenario NAME] [--json FILE]`.

Everything runs on the embedded PostgreSQL with the fake OpenAI server in its own process;
the syncer runs as its real command in a subprocess, so its CPU and memory are its own.
Usage and the latest figures: bench/RESULTS.md.
"""
