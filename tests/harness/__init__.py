"""What the tests and the benchmarks share; nothing else in ``tests/`` is imported by another module.

* ``services``: the machine's PostgreSQL and Redis, a fresh schema per stack and a Redis namespace (key prefix and
  Celery queue) per stack of this run, so that two runs on one machine do not interfere;
* ``stacks``: the service assembled (embedded, or PostgreSQL + Redis + a worker process; served as a process);
* ``models``: small networks and saving them as model files;
* ``zoo``: the ONNX Model Zoo graphs the onnx wheel ships, with seeded random weights;
* ``jobs``: the specs tests submit (``QUICK``, ``LONG``), posting a job, checking a problem document.

The pytest fixtures built from these are in ``tests/conftest.py``.
"""
