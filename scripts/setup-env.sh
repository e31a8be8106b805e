# Sourced by scripts/test, scripts/lint and scripts/demo: a virtual environment with the project installed
# (and the test, bench and lint extras).
# torch is pinned to the CPU wheel that lies on this kind of machine; a looser pin pulls a multi-GB CUDA build.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[test,bench,lint]"
    touch "$stamp"
fi
