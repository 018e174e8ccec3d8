"""The merge lab: a reproducible offline benchmark that ranks every merge method.

    python -m benchmarks.lab build [--quick]     # tokenizer, pre-trained T5, experts, multitask
    python -m benchmarks.lab table [--quick]     # every method: tables and figures
    python benchmarks/lab/build_data.py          # regenerate data/ from the Debian/PyPI sources

See README.md in this folder.
"""
