"""A sweep of norms × batch sizes × seeds: its plan (``config``), running it (``orchestrate``,
``runner``: worker processes), under torchrun (``ranks``, ``links``, ``data_parallel``), the
SQLite store of finished runs (``store``, ``lock``), and the checks made before any work
(``devices``, ``paths``).
"""
