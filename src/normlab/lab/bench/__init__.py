"""Speed and memory: normlab's layers against torch.nn (``layers``), the kernels per provider
(``kernels``), and the module-by-module baselines both time (``composites``).
"""
