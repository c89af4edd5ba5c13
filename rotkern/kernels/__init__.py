"""Stage 3: fused ops.

- ``reference``: the eager spec of each op (Alg 4's rotated AdamW, the two-sided step of the dynamic bases,
  rotated SGD-M);
- ``dispatch``: :func:`rotkern.kernels.dispatch.rotated_adamw`, the functional step the optimizers call, which
  picks each unit's implementation from :data:`rotkern._backend.BACKEND_TABLE`;
- the implementations: ``rotated_adamw_step`` and ``two_sided_adamw`` (Triton, sharing ``_tl``), ``ext`` (the
  compiled extension's op).

A new backend is one file here whose launcher has ``reference.rotated_adamw_ref``'s signature, one ``Backend``
entry in ``rotkern._backend.BACKEND_TABLE`` (and its place in ``AUTO_ORDER``), and its test against the reference.
"""
