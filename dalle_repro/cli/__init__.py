"""The command-line entry points. `launch/*.py` and `tools/*.py` are thin shims over these modules,
which `pip install .` also installs as `dalle-*` commands and which run as `python -m dalle_repro.cli.NAME`.
"""
