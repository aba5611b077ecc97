"""Launchers: check, allocate, launch one kernel (the thin layer between the backend table and the kernels).

Who calls what (a decode step of the dynamic cache, top to bottom)::

    MustafarLayer / StaticMustafarLayer           the caches (mustafar.cache)
      -> ops.sparse_decode_attention, ops.append    checks (dynamic path)
         cache.static_ops.static_decode_attention  checks (static, graph-capturable path)
        -> backends.pick(op, backend, ...)          the one table: cuda, triton, torch (auto's order)
          -> launch.cuda    -> csrc/*.cu            CUDA C++ decode + compress (compiled at first use)
          -> launch.decode  -> kernels.decode       Triton decode + split merge (@triton.jit)
             launch.compress -> kernels.compress    Triton prune + compress
          -> reference                              PyTorch references (any device; the test oracle)

``launch.common`` holds what the launchers share (``LOG2E``, ``choose_splits``, ``cdiv``, ``on_device``).
"""
